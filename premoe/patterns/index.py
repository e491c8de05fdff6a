"""The FAISS index over a pattern store's routing keys, and the search (see the similarity and
"where the search runs" notes in `premoe.patterns.store`). A mixin of `PatternStore`: it reads
the store's keys (`_keys`), key spec (`key`) and tasks, and owns the index (`_index`, its rows'
tasks `_row_tasks`, the keys' centre `_mu`, the device copy `_on_device`).

Shape legend: N rows (samples or tasks), D key dimension, k neighbours.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from premoe.errors import UsageError

log = logging.getLogger(__name__)

_HNSW_ABOVE = 1 << 22  # rows × dim above which "auto" builds an HNSW graph instead of a flat scan
_HNSW_M = 32
_HNSW_EF = 128


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class KeyIndex:
    """Index building and search over the store's keys (mixed into `PatternStore`)."""

    key: dict[str, Any]
    tasks: dict[str, Any]
    _keys: dict[str, dict[str, np.ndarray]]
    _index: Any
    _row_tasks: list[str]
    _mu: np.ndarray | None
    _on_device: tuple[torch.Tensor, torch.Tensor | None] | None

    def _center(self, unit: list[np.ndarray]) -> np.ndarray | None:
        """Mean [D] of all normalised keys `unit` (subtracted when key["center"] is set)."""
        if not self.key.get("center") or not unit:
            return None
        return np.concatenate(unit).mean(0).astype(np.float32)

    def _prepare(self, x: np.ndarray, center: np.ndarray | None) -> np.ndarray:
        """Keys [N, D] -> the unit vectors that are indexed/searched."""
        x = l2_normalise(x)
        return x if center is None else l2_normalise(x - center)

    def _rows(self) -> tuple[np.ndarray, list[str], np.ndarray | None]:
        """(rows [N, D] the index holds, their tasks, the centre they were made with)."""
        kind = self.key["kind"]
        unit = [l2_normalise(self._keys[t][kind]) for t in self.tasks]  # [N_t, D] each
        mu = self._center(unit)
        vecs: list[np.ndarray] = []
        labels: list[str] = []
        for task, k in zip(self.tasks, unit, strict=True):
            if mu is not None:
                k = l2_normalise(k - mu)  # as `_prepare`
            if self.key["search"] == "centroid":
                k = l2_normalise(k.mean(0, keepdims=True))  # [1, D]
            vecs.append(k)
            labels.extend([task] * len(k))
        if not vecs:
            return np.zeros((0, self.key_dim or 1), dtype=np.float32), [], mu
        return np.ascontiguousarray(np.concatenate(vecs)), labels, mu

    @property
    def key_dim(self) -> int | None:
        kind = self.key["kind"]
        for task in self._keys.values():
            if kind in task:
                return int(task[kind].shape[1])
        return None

    def _index_type(self, rows: int, dim: int) -> str:
        kind = self.key.get("index", "auto")
        if kind == "auto":
            return "hnsw" if rows * dim > _HNSW_ABOVE else "flat"
        return str(kind)

    def build_index(self) -> None:
        """(Re)build the FAISS index over the keys of the store's key spec."""
        import faiss

        x, labels, mu = self._rows()
        dim = x.shape[1]
        if self._index_type(len(x), dim) == "hnsw":
            index = faiss.IndexHNSWFlat(dim, _HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = _HNSW_EF
            index.hnsw.efSearch = max(_HNSW_EF, 4 * int(self.key["k"]))
        else:
            index = faiss.IndexFlatIP(dim)
        if len(x):
            index.add(x)
        self._index = index
        self._row_tasks = labels
        self._mu = mu
        self._on_device = None

    def search(self, key: np.ndarray | torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
        """Tasks by similarity to a query key [D], best first (at most `k`; see the module doc:
        a key on an accelerator is searched there, anything else with FAISS).

        In knn mode only tasks with at least one row among the query's nearest neighbours are
        returned.
        """
        if self._index is None:
            self.build_index()
        on_device = isinstance(key, torch.Tensor) and key.device.type != "cpu"
        if on_device:
            q: Any = key.detach().float().reshape(1, -1)  # [1, D] on the device
        else:
            host = key.detach().cpu().numpy() if isinstance(key, torch.Tensor) else key
            q = np.asarray(host, dtype=np.float32).reshape(1, -1)  # [1, D]
        dim = self._index.d
        if q.shape[1] != dim:
            raise UsageError(
                f"query key has dimension {q.shape[1]}, the store's keys have {dim} "
                f"(key kind {self.key['kind']!r})"
            )
        if not on_device and not np.all(np.isfinite(q)):
            raise UsageError("query key has non-finite values")
        n = self._index.ntotal
        if n == 0 or k < 1:
            return []
        nn = min(k, n) if self.key["search"] == "centroid" else min(int(self.key["k"]), n)
        if on_device:
            sims, idx = self._search_on_device(q, nn)
            if not np.all(np.isfinite(sims)):  # a non-finite key makes every similarity NaN
                raise UsageError("query key has non-finite values")
        else:
            sims, idx = self._search_one(self._prepare(q, self._mu), nn)
        if self.key["search"] == "centroid":
            return [
                (self._row_tasks[i], float(s))
                for s, i in zip(sims[0], idx[0], strict=True)
                if i >= 0
            ]
        votes: dict[str, float] = defaultdict(float)
        for s, i in zip(sims[0], idx[0], strict=True):
            if i >= 0:
                votes[self._row_tasks[i]] += float(s)
        ranked = sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))
        return [(task, v / nn) for task, v in ranked[:k]]

    def _search_one(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search one query [1, D] on one OpenMP thread: for a single query, starting and
        joining a thread team costs more than the split saves (measured: 10,000 x 2048 flat,
        14 ms on one thread vs 64 ms on two on a 2-core machine)."""
        import faiss

        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self._index.search(q, k)
        finally:
            faiss.omp_set_num_threads(threads)

    def _search_on_device(self, q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner-product search of one raw query [1, D] on its own device (module doc)."""
        if self._on_device is None or self._on_device[0].device != q.device:
            rows, _, center = self._rows()  # [N, D] unit vectors: what the index holds
            mu = None if center is None else torch.from_numpy(center).to(q.device)
            self._on_device = (torch.from_numpy(rows).to(q.device), mu)
        rows, mu = self._on_device
        q = torch.nn.functional.normalize(q, dim=-1, eps=1e-12)  # as _prepare
        if mu is not None:
            q = torch.nn.functional.normalize(q - mu, dim=-1, eps=1e-12)
        top = torch.topk(rows @ q[0], k)  # [N] -> k
        both = torch.stack([top.values, top.indices.to(torch.float64)]).cpu().numpy()  # one copy
        return both[:1].astype(np.float32), both[1:].astype(np.int64)
