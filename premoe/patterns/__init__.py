"""Pattern stores: per-task expert-usage scores and a FAISS index of routing keys."""

from __future__ import annotations

from premoe.patterns.store import GLOBAL, METRICS, PatternStore, TaskInfo, key_spec

__all__ = ["GLOBAL", "METRICS", "PatternStore", "TaskInfo", "key_spec"]
