"""Pruned loading and expert residency: `load_pruned`, `ResidentModel`, `HostExpertCache`."""

from __future__ import annotations

from premoe.load.loader import (
    ExpertIO,
    LoadInfo,
    SizeModel,
    keep_for_budget,
    load_pruned,
    load_pruned_with_info,
    parse_bytes,
    resolve_device,
    resolve_dtype,
    size_model,
)

__all__ = [
    "ExpertIO",
    "LoadInfo",
    "SizeModel",
    "keep_for_budget",
    "load_pruned",
    "load_pruned_with_info",
    "parse_bytes",
    "resolve_device",
    "resolve_dtype",
    "size_model",
]
