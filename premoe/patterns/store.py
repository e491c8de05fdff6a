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

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import premoe
from premoe.errors import StoreError, StoreMismatchError, UsageError
from premoe.fingerprint import describe_difference, same_model
from premoe.patterns.files import StoreFiles
from premoe.patterns.index import KeyIndex
from premoe.patterns.layout import (  # noqa: F401  (re-exported: the store's public names)
    DEFAULT_KNN,
    FORMAT,
    FORMAT_VERSION,
    GLOBAL,
    INDEX_FILE,
    INDEX_TYPES,
    KEY_KINDS,
    META_FILE,
    METRICS,
    ROUTERS_FILE,
    SCORES_FILE,
    SEARCHES,
    TaskInfo,
)

log = logging.getLogger(__name__)


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


class PatternStore(KeyIndex, StoreFiles):
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
