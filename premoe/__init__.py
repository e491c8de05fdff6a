"""premoe: task-specific expert pruning and retrieval for Mixture-of-Experts language models."""

from __future__ import annotations

__version__ = "0.1.0"
