"""Reading and writing a pattern store folder (`store.json`, `scores.safetensors`,
`index.faiss`, optional `routers.safetensors`): atomic writes under the output's lock, with a
compare-and-swap against concurrent writers, and validated loads (every inconsistency is a
one-line `StoreError`). A mixin of `PatternStore` (`premoe.patterns.store`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import premoe
from premoe.errors import OutputError, StoreError
from premoe.fingerprint import same_model
from premoe.io.atomic import atomic_output_dir, default_mode, output_lock
from premoe.patterns.layout import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    KEY_KINDS,
    META_FILE,
    METRICS,
    ROUTERS_FILE,
    SCORES_FILE,
    SEARCHES,
    TaskInfo,
)

if TYPE_CHECKING:
    from premoe.patterns.store import PatternStore

log = logging.getLogger(__name__)


class StoreFiles:
    """Save and load (mixed into `PatternStore`)."""

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
        fresh = type(self).load(path)
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
