"""Task-adaptive expert retrieval: route a query to the stored pattern that fits it."""

from __future__ import annotations

from premoe.route.keys import QueryKeyer
from premoe.route.retrieve import (
    DEFAULT_THRESHOLD,
    Candidate,
    RouteResult,
    route,
    route_key,
)

__all__ = ["DEFAULT_THRESHOLD", "Candidate", "QueryKeyer", "RouteResult", "route", "route_key"]
