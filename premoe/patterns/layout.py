"""What a pattern store folder holds: file names, format version, metric and key vocabularies,
and the per-task record (`TaskInfo`). Shared by the store (`premoe.patterns.store`) and its
files (`premoe.patterns.files`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FORMAT = "premoe-pattern-store"
FORMAT_VERSION = 1
META_FILE = "store.json"
SCORES_FILE = "scores.safetensors"
INDEX_FILE = "index.faiss"
ROUTERS_FILE = "routers.safetensors"
"""Calibrated routers (optional; stores without them have no such file and no "calibrated")."""
GLOBAL = "__global__"
"""Name of the pooled pattern (all tasks, token-weighted), the default routing fallback."""

METRICS: tuple[str, ...] = ("tcess", "frequency", "paper-logits", "reap")
KEY_KINDS: tuple[str, ...] = ("router_input", "tcess")
SEARCHES: tuple[str, ...] = ("knn", "centroid")
INDEX_TYPES: tuple[str, ...] = ("auto", "flat", "hnsw")
DEFAULT_KNN = 15


@dataclass
class TaskInfo:
    """What store.json records about one task."""

    source: str
    samples: int
    tokens: int
    created: str  # ISO 8601, UTC
    options: dict[str, Any] = field(default_factory=dict)
