"""The pattern store: per-task expert-usage scores and a FAISS index of routing keys.

A store is a folder of three files, written together atomically:

- ``store.json``: format and premoe version, the source model's fingerprint, the metrics and
  their options, the key spec, and per task its source, sample and token counts, creation time
  and profiling options;
- ``scores.safetensors``: per task ``sums/{task}/{row}`` [L, E] float64 (rows: ``counts``, the
  routed selections per expert, and each accumulated metric), ``tokens/{task}`` [1] int64, and
  the per-sample routing keys ``keys/{task}/{kind}`` [N, D] float32 for both key kinds;
- ``index.faiss``: the FAISS index over the keys of the store's key kind (`faiss.write_index`).

No pickle anywhere. Sums and token counts (not only means) are kept so that tasks merge and grow.

**Similarity.** Keys are L2-normalised and searched by inner product, i.e. cosine similarity.
Cosine ignores a key's length, which for a mean hidden state depends on the prompt's length and
position mix rather than its content, and for a TCESS vector only scales with the threshold;
what identifies a task is the direction. With ``search="knn"`` (default, DESIGN.md (b)) every
calibration sample is one row; a query's k nearest rows (k = ``key["k"]``, ≈15) vote, each with
its cosine, and a task's similarity is the sum of its voters' cosines divided by k (so it equals
the cosine when all k neighbours agree, and drops for ambiguous or far-away queries). With
``search="centroid"`` each task is one row (the normalised mean of its samples' normalised keys)
and the similarity is the plain cosine.

**Where the search runs.** A key given as a numpy array (or a CPU tensor) is searched with the
FAISS index. A key given as a tensor on an accelerator (`QueryKeyer.key_tensor`: the model is
there) is searched there, exactly, over the vectors the index holds (copied to that device
once): one [N, D] x [D] product and a top-k, the computation of `IndexFlatIP`, with no
copy of the key to the host. For an HNSW index that is the exact answer its graph approximates.
Measured on an H100 (bench/RESULTS.md): 10,000 x 2048 keys, FAISS on one CPU thread 3.2 ms
(flat) / 1.6 ms (HNSW), the device search 0.19 ms.

Shape legend: L MoE layers (model order), E routed experts, N samples, D key dimension.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import premoe
from premoe.errors import OutputError, StoreError, StoreMismatchError, UsageError
from premoe.fingerprint import describe_difference, same_model
from premoe.io.atomic import atomic_output_dir, default_mode, output_lock

log = logging.getLogger(__name__)

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
_HNSW_ABOVE = 1 << 22  # rows × dim above which "auto" builds an HNSW graph instead of a flat scan
_HNSW_M = 32
_HNSW_EF = 128


def key_spec(
    kind: str = "router_input",
    layer: int = 0,
    search: str = "knn",
    k: int = DEFAULT_KNN,
    index: str = "auto",
    center: bool = False,
) -> dict[str, Any]:
    """A validated key spec, as stored in store.json."""
    if kind not in KEY_KINDS:
        raise UsageError(f"unknown key kind {kind!r}; choose from {', '.join(KEY_KINDS)}")
    if search not in SEARCHES:
        raise UsageError(f"unknown search {search!r}; choose from {', '.join(SEARCHES)}")
    if index not in INDEX_TYPES:
        raise UsageError(f"unknown index type {index!r}; choose from {', '.join(INDEX_TYPES)}")
    if int(k) < 1:
        raise UsageError(f"--knn must be >= 1, got {k}")
    return {
        "kind": kind,
        "layer": int(layer),
        "search": search,
        "k": int(k),
        "index": index,
        "center": bool(center),
        "similarity": "cosine",
    }


@dataclass
class TaskInfo:
    """What store.json records about one task."""

    source: str
    samples: int
    tokens: int
    created: str  # ISO 8601, UTC
    options: dict[str, Any] = field(default_factory=dict)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class PatternStore:
    """Per-task expert-usage patterns of one model, with a FAISS index over routing keys."""

    path: Path | None
    model: dict[str, Any]
    metrics: list[str]
    moe_layers: list[int]
    num_experts: int
    key: dict[str, Any]
    tasks: dict[str, TaskInfo]

    def __init__(
        self,
        model: dict[str, Any],
        metrics: list[str],
        key: dict[str, Any],
        *,
        metric_options: dict[str, Any] | None = None,
        premoe_version: str | None = None,
        path: Path | None = None,
    ) -> None:
        self.path = path
        self.model = dict(model)
        self.metrics = list(metrics)
        self.moe_layers = [int(i) for i in model["moe_layers"]]
        self.num_experts = int(model["num_experts"])
        self.top_k = int(model["top_k"])
        self.key = dict(key)
        self.metric_options = dict(metric_options or {})
        self.premoe_version = premoe_version or premoe.__version__
        self.tasks = {}
        self._sums: dict[str, dict[str, torch.Tensor]] = {}  # task -> row -> [L, E] float64
        self._tokens: dict[str, int] = {}
        self._keys: dict[str, dict[str, np.ndarray]] = {}  # task -> kind -> [N, D] float32
        self._index: Any = None
        self._row_tasks: list[str] = []
        self._mu: np.ndarray | None = None  # centre of the keys (key["center"])
        self._on_device: tuple[torch.Tensor, torch.Tensor | None] | None = None  # rows, centre
        # compare-and-swap at save: the store.json digest this object was loaded from (or last
        # saved as), and the tasks changed since (see `save`)
        self._base: tuple[Path, str] | None = None
        self._changed: set[str] = set()
        self._removed: set[str] = set()
        # calibrated routers: name -> (meta, {"{layer}/{role}": tensor}); see `set_routers`
        self._routers: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}

    # -- contents ----------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.moe_layers), self.num_experts

    @property
    def default_metric(self) -> str:
        """The metric used when none is named: tcess if the store has it, else its first."""
        return "tcess" if "tcess" in self.metrics else self.metrics[0]

    def add_task(
        self,
        name: str,
        info: TaskInfo,
        sums: dict[str, torch.Tensor],
        keys: dict[str, Any],
        *,
        rebuild: bool = True,
    ) -> None:
        """Add or replace a task. `sums`: row -> [L, E] (rows: counts + accumulated metrics)."""
        need = {"counts", *(m for m in self.metrics if m != "frequency")}
        missing = need - set(sums)
        if missing:
            raise StoreError(f"task {name!r} lacks sums for {', '.join(sorted(missing))}")
        clean = {}
        for row, t in sums.items():
            t = torch.as_tensor(t, dtype=torch.float64).cpu()
            if tuple(t.shape) != self.shape:
                raise StoreError(
                    f"task {name!r} sums {row} have shape {tuple(t.shape)}, expected {self.shape}"
                )
            clean[row] = t.contiguous()
        self.tasks[name] = info
        self._changed.add(name)
        self._removed.discard(name)
        self._sums[name] = clean
        self._tokens[name] = int(info.tokens)
        self._keys[name] = {
            k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in keys.items()
        }
        if rebuild:
            self.build_index()

    def remove_task(self, name: str) -> None:
        self._check_task(name)
        for d in (self.tasks, self._sums, self._tokens, self._keys):
            d.pop(name, None)  # type: ignore[attr-defined]
        self._removed.add(name)
        self._changed.discard(name)
        for r in [r for r, (meta, _) in self._routers.items() if meta.get("task") == name]:
            del self._routers[r]
        self.build_index()

    # -- calibrated routers ------------------------------------------------------------------------
    @property
    def calibrated(self) -> dict[str, dict[str, Any]]:
        """name -> meta of every calibrated router set (meta: task, keep, top_k, info)."""
        return {name: dict(meta) for name, (meta, _) in self._routers.items()}

    def set_routers(
        self, name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> None:
        """Keep a calibrated router set under `name` (replacing one of the same name).

        `meta` needs ``task`` (a task of the store), ``keep`` ({layer: kept original ids}) and
        ``top_k``; `tensors` maps ``"{layer}/{role}"`` to the router tensor in slot order
        (`premoe.calibrate.CalibratedRouters`).
        """
        for field_name in ("task", "keep", "top_k"):
            if field_name not in meta:
                raise StoreError(f"calibrated routers {name!r} lack {field_name!r}")
        self._check_task(str(meta["task"]))
        if "/" in name or not name:
            raise StoreError(f"bad calibrated router name {name!r}")
        layers = {str(i) for i in self.moe_layers}
        if set(map(str, meta["keep"])) != layers:
            raise StoreError(f"calibrated routers {name!r} do not cover the store's MoE layers")
        clean = {}
        for key, t in tensors.items():
            layer = key.split("/", 1)[0]
            if layer not in layers:
                raise StoreError(f"calibrated routers {name!r}: {key} is not an MoE layer")
            clean[key] = torch.as_tensor(t).detach().float().cpu().contiguous()
        self._routers[name] = (json.loads(json.dumps(meta)), clean)

    def routers(self, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(meta, {"{layer}/{role}": tensor}) of a calibrated router set."""
        if name not in self._routers:
            valid = ", ".join(self._routers) or "none"
            raise StoreError(f"no calibrated routers {name!r} in this store (it has: {valid})")
        meta, tensors = self._routers[name]
        return dict(meta), dict(tensors)

    def remove_routers(self, name: str) -> None:
        self.routers(name)
        del self._routers[name]

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            valid = ", ".join(self.tasks) or "none"
            raise StoreError(f"unknown task {task!r}; tasks in this store: {valid}")

    def _check_metric(self, metric: str) -> None:
        if metric not in self.metrics:
            raise StoreError(
                f"metric {metric!r} is not in this store; metrics: {', '.join(self.metrics)}"
            )

    def _mean(self, sums: dict[str, torch.Tensor], tokens: int, metric: str) -> torch.Tensor:
        counts = sums["counts"]
        if metric == "frequency":
            out = counts / max(tokens * self.top_k, 1)
        elif metric == "reap":  # REAP: mean over the tokens routed to each expert
            out = sums["reap"] / counts.clamp(min=1.0)
        else:
            out = sums[metric] / max(tokens, 1)
        return out.float()

    def scores(self, task: str, metric: str = "tcess") -> torch.Tensor:
        """[L, E] float32 per-layer means of `metric` for `task`.

        Means are sums / tokens (``frequency``: share of routed selections, each layer sums to
        1), except ``reap``, whose mean is over the tokens routed to each expert (REAP's
        definition; experts never routed score 0).
        """
        if task == GLOBAL:
            return self.pooled_scores(metric)
        self._check_task(task)
        self._check_metric(metric)
        return self._mean(self._sums[task], self._tokens[task], metric)

    def sums(self, task: str) -> dict[str, torch.Tensor]:
        """The raw [L, E] float64 sums of a task (rows: counts and accumulated metrics)."""
        self._check_task(task)
        return {k: v.clone() for k, v in self._sums[task].items()}

    def tokens(self, task: str) -> int:
        self._check_task(task)
        return self._tokens[task]

    def pooled_scores(self, metric: str = "tcess") -> torch.Tensor:
        """[L, E] float32 scores of all tasks pooled (sums added, so token-weighted)."""
        self._check_metric(metric)
        if not self.tasks:
            raise StoreError("the store has no task")
        rows = next(iter(self._sums.values())).keys()
        pooled = {r: sum(self._sums[t][r] for t in self.tasks) for r in rows}
        return self._mean(pooled, sum(self._tokens.values()), metric)  # type: ignore[arg-type]

    def keys(self, task: str, kind: str | None = None) -> np.ndarray:
        """Per-sample routing keys [N, D] of a task (not normalised)."""
        self._check_task(task)
        return self._keys[task][kind or self.key["kind"]].copy()

    # -- index -------------------------------------------------------------------------------------
    def _center(self, unit: list[np.ndarray]) -> np.ndarray | None:
        """Mean [D] of all normalised keys `unit` (subtracted when key["center"] is set)."""
        if not self.key.get("center") or not unit:
            return None
        return np.concatenate(unit).mean(0).astype(np.float32)

    def _prepare(self, x: np.ndarray, center: np.ndarray | None) -> np.ndarray:
        """Keys [N, D] -> the unit vectors that are indexed/searched."""
        x = _l2_normalise(x)
        return x if center is None else _l2_normalise(x - center)

    def _rows(self) -> tuple[np.ndarray, list[str], np.ndarray | None]:
        """(rows [N, D] the index holds, their tasks, the centre they were made with)."""
        kind = self.key["kind"]
        unit = [_l2_normalise(self._keys[t][kind]) for t in self.tasks]  # [N_t, D] each
        mu = self._center(unit)
        vecs: list[np.ndarray] = []
        labels: list[str] = []
        for task, k in zip(self.tasks, unit, strict=True):
            if mu is not None:
                k = _l2_normalise(k - mu)  # as `_prepare`
            if self.key["search"] == "centroid":
                k = _l2_normalise(k.mean(0, keepdims=True))  # [1, D]
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

    def with_key(
        self,
        kind: str | None = None,
        search: str | None = None,
        k: int | None = None,
        index: str | None = None,
        center: bool | None = None,
        *,
        build: bool = True,
    ) -> PatternStore:
        """A copy (sharing tensors) whose index uses another key kind or search mode (built
        unless `build` is False: then the caller must call `build_index`)."""
        spec = key_spec(
            kind or self.key["kind"],
            self.key["layer"],
            search or self.key["search"],
            self.key["k"] if k is None else k,
            index or self.key.get("index", "auto"),
            self.key.get("center", False) if center is None else center,
        )
        other = PatternStore(
            self.model,
            self.metrics,
            spec,
            metric_options=self.metric_options,
            premoe_version=self.premoe_version,
            path=self.path,
        )
        other.tasks, other._sums = dict(self.tasks), dict(self._sums)
        other._tokens, other._keys = dict(self._tokens), dict(self._keys)
        other._base, other._changed, other._removed = (
            self._base,
            set(self._changed),
            set(self._removed),
        )
        other._routers = dict(self._routers)
        if build:
            other.build_index()
        return other

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

    # -- model binding -----------------------------------------------------------------------------
    def check_model(self, fingerprint: dict[str, Any]) -> None:
        """Raise StoreMismatchError if `fingerprint` is not the store's source model."""
        if not same_model(self.model, fingerprint):
            where = f" {self.path}" if self.path else ""
            raise StoreMismatchError(
                f"pattern store{where} was made for another model "
                f"({describe_difference(self.model, fingerprint)}); profile this model into "
                "a new store"
            )

    # -- JSON views --------------------------------------------------------------------------------
    def to_json(self, tasks: list[str] | None = None) -> dict[str, Any]:
        """The `premoe patterns show --json` contract (per-layer means, MoE layers in order)."""
        names = self.task_names if tasks is None else tasks
        for t in names:
            self._check_task(t)
        return {
            "premoe_version": self.premoe_version,
            "model": dict(self.model),
            "metrics": list(self.metrics),
            "tasks": {
                t: {
                    "samples": self.tasks[t].samples,
                    "tokens": self.tasks[t].tokens,
                    "scores": {m: self.scores(t, m).tolist() for m in self.metrics},
                }
                for t in names
            },
        }

    def _meta(self) -> dict[str, Any]:
        dim = self.key_dim
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "premoe_version": self.premoe_version,
            "model": self.model,
            "metrics": self.metrics,
            "metric_options": self.metric_options,
            "key": self.key,
            "moe_layers": self.moe_layers,
            "num_experts": self.num_experts,
            "index": {
                "rows": int(self._index.ntotal) if self._index is not None else 0,
                "dim": dim,
                "type": type(self._index).__name__,
                "tasks": self._row_tasks_runs(),
            },
            "tasks": {name: asdict(info) for name, info in self.tasks.items()},
            **({"calibrated": self.calibrated} if self._routers else {}),
        }

    def _row_tasks_runs(self) -> list[list[Any]]:
        runs: list[list[Any]] = []
        for t in self._row_tasks:
            if runs and runs[-1][0] == t:
                runs[-1][1] += 1
            else:
                runs.append([t, 1])
        return runs

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False, merge: bool = False) -> None:
        """Write the store folder atomically (an existing one is replaced only with overwrite).

        Compare-and-swap, under the output's lock: if the store at `path` changed since this
        object was loaded from it (another process added tasks meanwhile), or `merge` is set and
        a store appeared there, this object's added/removed tasks are applied to that store
        instead of replacing it, so no task is lost; a store that cannot take them (another
        model, other metrics) is a `StoreError` and nothing is written.
        """
        path = Path(path).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror} ({path.parent})") from None
        with output_lock(path):
            on_disk = _meta_digest(path)
            ours = self._base is not None and self._base[0] == path
            if on_disk is not None and (merge or ours) and (not ours or self._base[1] != on_disk):
                self._rebase(path)
                overwrite = True
            self._write(path, overwrite)
            self._base = (path, _meta_digest(path) or "")
            self._changed.clear()
            self._removed.clear()

    def _rebase(self, path: Path) -> None:
        """Apply this store's changed tasks onto the store now at `path` (see `save`)."""
        fresh = PatternStore.load(path)
        same = (
            same_model(fresh.model, self.model)
            and set(fresh.metrics) == set(self.metrics)
            and fresh.metric_options == self.metric_options
        )
        if not same:
            raise StoreError(
                f"pattern store {path} was replaced by another premoe process while this one "
                f"ran (metrics {', '.join(fresh.metrics)}, options {fresh.metric_options}); "
                "nothing was written: run again"
            )
        k = self.key
        merged = fresh.with_key(
            k["kind"], k["search"], k["k"], k.get("index"), k.get("center"), build=False
        )
        for name in self._removed & set(merged.tasks):
            for d in (merged.tasks, merged._sums, merged._tokens, merged._keys):
                d.pop(name, None)  # type: ignore[attr-defined]
        for name in sorted(self._changed & set(self.tasks)):
            merged.add_task(
                name, self.tasks[name], self._sums[name], self._keys[name], rebuild=False
            )
        merged.build_index()
        log.warning(
            "pattern store %s was changed by another premoe process meanwhile; adding this "
            "run's task(s) %s to its %d task(s)",
            path,
            ", ".join(sorted(self._changed)) or "-",
            len(fresh.tasks),
        )
        self.tasks, self._sums, self._tokens = merged.tasks, merged._sums, merged._tokens
        self._keys, self._index, self._row_tasks = merged._keys, merged._index, merged._row_tasks
        self._mu, self._on_device = merged._mu, None
        self.metrics = merged.metrics
        routers = {**fresh._routers, **self._routers}  # calibrated routers of both runs
        self._routers = {n: r for n, r in routers.items() if r[0].get("task") not in self._removed}

    def _write(self, path: Path, overwrite: bool) -> None:
        import faiss

        if self._index is None:
            self.build_index()
        tensors: dict[str, torch.Tensor] = {}
        for task in self.tasks:
            for row, t in self._sums[task].items():
                tensors[f"sums/{task}/{row}"] = t.contiguous()
            tensors[f"tokens/{task}"] = torch.tensor([self._tokens[task]], dtype=torch.int64)
            for kind, k in self._keys[task].items():
                tensors[f"keys/{task}/{kind}"] = torch.from_numpy(np.ascontiguousarray(k))
        meta = json.dumps(self._meta(), indent=2, sort_keys=False) + "\n"
        with atomic_output_dir(path, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp / SCORES_FILE), metadata={"format": "pt"})
            faiss.write_index(self._index, str(tmp / INDEX_FILE))
            (tmp / META_FILE).write_text(meta, encoding="utf-8")
            files = [SCORES_FILE, INDEX_FILE, META_FILE]
            if self._routers:
                routers = {
                    f"{name}/{key}": t
                    for name, (_, ts) in self._routers.items()
                    for key, t in ts.items()
                }
                save_file(routers, str(tmp / ROUTERS_FILE), metadata={"format": "pt"})
                files.append(ROUTERS_FILE)
            for name in files:  # as a plain open() would make them
                os.chmod(tmp / name, default_mode(is_dir=False))
        self.path = path
        log.info("saved pattern store %s (%d tasks)", path, len(self.tasks))

    @classmethod
    def load(cls, path: str | Path) -> PatternStore:
        """Load and validate a store folder; any inconsistency is a one-line StoreError."""
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"no pattern store at {path} (make one with `premoe profile`)")
        meta = _read_meta(path)
        try:
            store = cls(
                meta["model"],
                list(meta["metrics"]),
                dict(meta["key"]),
                metric_options=dict(meta.get("metric_options") or {}),
                premoe_version=str(meta.get("premoe_version", "")),
                path=path,
            )
            tasks = {
                name: TaskInfo(
                    source=str(t["source"]),
                    samples=int(t["samples"]),
                    tokens=int(t["tokens"]),
                    created=str(t["created"]),
                    options=dict(t.get("options") or {}),
                )
                for name, t in meta["tasks"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreError(
                f"{path / META_FILE} is incomplete ({type(exc).__name__}: {exc})"
            ) from None
        if (
            store.moe_layers != [int(i) for i in meta.get("moe_layers", store.moe_layers)]
            or int(meta.get("num_experts", store.num_experts)) != store.num_experts
        ):
            raise StoreError(f"{path / META_FILE}: layer/expert counts disagree with the model")
        for m in store.metrics:
            if m not in METRICS:
                raise StoreError(f"{path / META_FILE}: unknown metric {m!r}")
        if store.key.get("kind") not in KEY_KINDS or store.key.get("search") not in SEARCHES:
            raise StoreError(f"{path / META_FILE}: bad key spec {store.key}")
        tensors = _read_tensors(path)
        for name, info in tasks.items():
            store._load_task(path, name, info, tensors)
        store._check_index(path, _read_index(path))
        store._base = (path, _meta_digest(path) or "")
        store._changed.clear()
        store._load_routers(path, meta.get("calibrated"))
        return store

    def _load_routers(self, path: Path, calibrated: Any) -> None:
        """Calibrated routers, if store.json lists any (older stores have none)."""
        if not calibrated:
            return
        if not isinstance(calibrated, dict):
            raise StoreError(f"{path / META_FILE}: 'calibrated' is not a mapping")
        tensors = _read_tensors(path, ROUTERS_FILE)
        for name, meta in calibrated.items():
            prefix = f"{name}/"
            own = {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
            if not own:
                raise StoreError(f"{path / ROUTERS_FILE} lacks the calibrated routers {name!r}")
            try:
                self.set_routers(name, dict(meta), own)
            except StoreError as exc:
                raise StoreError(f"{path}: {exc}") from None

    def _load_task(
        self, path: Path, name: str, info: TaskInfo, tensors: dict[str, torch.Tensor]
    ) -> None:
        where = path / SCORES_FILE
        rows = ["counts", *(m for m in self.metrics if m != "frequency")]
        sums = {}
        for row in rows:
            t = tensors.get(f"sums/{name}/{row}")
            if t is None:
                raise StoreError(f"{where} lacks the {row} sums of task {name!r}")
            if tuple(t.shape) != self.shape or t.dtype != torch.float64:
                raise StoreError(
                    f"{where}: {row} sums of task {name!r} are {tuple(t.shape)} {t.dtype}, "
                    f"expected {self.shape} float64 (the model has {self.shape[0]} MoE layers "
                    f"of {self.shape[1]} experts)"
                )
            sums[row] = t
        tok = tensors.get(f"tokens/{name}")
        if tok is None or tok.numel() != 1 or int(tok.item()) != info.tokens:
            raise StoreError(f"{where}: token count of task {name!r} disagrees with {META_FILE}")
        keys = {}
        for kind in KEY_KINDS:
            k = tensors.get(f"keys/{name}/{kind}")
            if k is None:
                if kind == self.key["kind"]:
                    raise StoreError(f"{where} lacks the {kind} keys of task {name!r}")
                continue
            if k.dim() != 2 or k.shape[0] != info.samples or k.dtype != torch.float32:
                raise StoreError(
                    f"{where}: {kind} keys of task {name!r} are {tuple(k.shape)} {k.dtype}, "
                    f"expected [{info.samples}, D] float32"
                )
            keys[kind] = k.numpy()
        self.add_task(name, info, sums, keys, rebuild=False)

    def _check_index(self, path: Path, index: Any) -> None:
        where = path / INDEX_FILE
        x, labels, mu = self._rows()
        if index.ntotal != len(x):
            raise StoreError(
                f"{where} holds {index.ntotal} keys but the store has {len(x)} "
                f"({self.key['search']} over {len(self.tasks)} tasks); re-run `premoe profile`"
            )
        if len(x) and index.d != x.shape[1]:
            raise StoreError(f"{where} has key dimension {index.d}, the keys have {x.shape[1]}")
        if len(x):
            try:
                stored = index.reconstruct_n(0, index.ntotal)
            except RuntimeError:
                stored = None
            if stored is not None and not np.allclose(stored, x, atol=1e-5):
                raise StoreError(f"{where} does not match the stored keys; re-run `premoe profile`")
        self._index = index
        self._row_tasks = labels
        self._mu = mu
        self._on_device = None


def _meta_digest(path: Path) -> str | None:
    """sha256 of a store's store.json (None: no store there): its version for `save`."""
    try:
        return hashlib.sha256((path / META_FILE).read_bytes()).hexdigest()
    except OSError:
        return None


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / META_FILE
    if not file.is_file():
        raise StoreError(f"{path} is not a pattern store (no {META_FILE})")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise StoreError(f"{file} is damaged ({msg}); re-run `premoe profile`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{file} is not a premoe pattern store")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise StoreError(
            f"{file} has format version {version!r}; this premoe ({premoe.__version__}) reads "
            f"version {FORMAT_VERSION}: upgrade premoe or re-profile"
        )
    if not isinstance(meta.get("tasks"), dict) or not isinstance(meta.get("model"), dict):
        raise StoreError(f"{file} is incomplete (no tasks or model)")
    return meta


def _read_tensors(path: Path, name: str = SCORES_FILE) -> dict[str, torch.Tensor]:
    file = path / name
    if not file.is_file():
        raise StoreError(f"{path} lacks {name}; re-run `premoe profile`")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"{file} is damaged ({first}); re-run `premoe profile`") from None


def _read_index(path: Path) -> Any:
    import faiss

    file = path / INDEX_FILE
    if not file.is_file():
        raise StoreError(f"{path} lacks {INDEX_FILE}; re-run `premoe profile`")
    try:
        return faiss.read_index(str(file))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if len(first) > 160:
            first = first[:157] + "..."
        raise StoreError(f"{file} is damaged ({first}); re-run `premoe profile`") from None


def created_now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


__all__ = [
    "GLOBAL",
    "PatternStore",
    "TaskInfo",
    "created_now",
    "key_spec",
]
