"""`profile()`: run a model over task corpora and write per-task expert-usage patterns.

Checks every input before the model runs (tasks, output location, store compatibility, token
window), loads the corpora, runs them (`premoe.profile.distributed.profile_corpora`: one process,
`--sequential`, or data-parallel) and adds the tasks to a new or existing `PatternStore`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from premoe.errors import StoreError, UsageError
from premoe.io.atomic import check_not_input, check_writable, is_premoe_output, refuse_existing
from premoe.patterns.store import DEFAULT_KNN, PatternStore, TaskInfo, created_now, key_spec
from premoe.profile.corpus import check_task_name, load_task
from premoe.profile.distributed import check_options, profile_corpora
from premoe.profile.metrics import DEFAULT_METRIC, check_metrics, check_threshold
from premoe.profile.profiler import DEFAULT_MAX_LENGTH, ModelHandle, Progress

log = logging.getLogger(__name__)


def _existing_store(out: Path, overwrite: bool) -> PatternStore | None:
    if overwrite or not out.exists():
        return None
    if not (out / "store.json").exists():
        hint = " or pass --overwrite" if is_premoe_output(out) else ""
        raise StoreError(f"{out} exists and is not a pattern store; choose another --out{hint}")
    return PatternStore.load(out)


def _check_out(out: Path, overwrite: bool, model: Path | None, tasks: Mapping[str, Any]) -> None:
    """The store location, before any work: not an input, replaceable, writable."""
    inputs: list[tuple[str, str | Path | None]] = [("model folder", model)]
    for name, source in tasks.items():
        src = str(source)
        local = src[3:].split(":")[0] if src.startswith("hf:") else src
        inputs.append((f"corpus of task {name!r}", local or None))
    check_not_input(out, inputs)
    if overwrite:
        refuse_existing(out, overwrite=True)
    check_writable(out)


def _check_max_length(existing: PatternStore | None, tasks: Any, max_length: int) -> None:
    """Refuse mixing token windows: the store's other tasks were profiled with another
    --max-length."""
    if existing is None:
        return
    other = {
        name: info.options.get("max_length")
        for name, info in existing.tasks.items()
        if name not in tasks and info.options.get("max_length") is not None
    }
    bad = sorted(n for n, v in other.items() if int(v) != max_length)
    if bad:
        used = sorted({int(other[n]) for n in bad})
        raise UsageError(
            f"store {existing.path} holds tasks profiled with --max-length "
            f"{', '.join(map(str, used))} ({', '.join(bad)}), not {max_length}; use the same "
            "--max-length to add tasks, or pass --overwrite to start a new store"
        )


def _merge_options(
    existing: PatternStore | None,
    metrics: Any,
    threshold: float | None,
) -> tuple[list[str], float]:
    if existing is None:
        return check_metrics(metrics or [DEFAULT_METRIC]), check_threshold(threshold or 0.0)
    have = existing.metrics
    stored_r = float(existing.metric_options.get("threshold", 0.0))
    chosen = check_metrics(metrics) if metrics else list(have)
    if set(chosen) != set(have):
        raise UsageError(
            f"store {existing.path} holds metrics {', '.join(have)}; profile with the same "
            "metrics to add tasks, or pass --overwrite to start a new store"
        )
    if threshold is not None and check_threshold(threshold) != stored_r:
        raise UsageError(
            f"store {existing.path} was profiled with --threshold {stored_r}; use it again, "
            "or pass --overwrite to start a new store"
        )
    return list(have), stored_r


def _max_length(
    existing: PatternStore | None, tasks: Any, max_length: int | None, config: Any
) -> int:
    """The token window: `max_length` (default: the store's, else 512) clamped to the model's
    positions; it must match the store's other tasks."""
    if max_length is None:
        known = [t.options.get("max_length") for t in (existing.tasks if existing else {}).values()]
        max_length = next((int(v) for v in known if v is not None), DEFAULT_MAX_LENGTH)
    if max_length < 1:
        raise UsageError(f"--max-length must be >= 1, got {max_length}")
    max_pos = getattr(config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and 0 < max_pos < max_length:
        log.info("max_length %d > the model's %d positions: using %d", max_length, max_pos, max_pos)
        max_length = max_pos
    _check_max_length(existing, tasks, max_length)
    return max_length


def profile(
    model: Any,
    tasks: Mapping[str, str | Path],
    *,
    tokenizer: Any = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    metrics: Any = None,
    threshold: float | None = None,
    key: str | None = None,
    search: str | None = None,
    knn: int | None = None,
    index: str | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: str | dict[str, Any] | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
    max_tokens: int | None = None,
    max_length: int | None = None,
    seed: int = 0,
    text_field: str | None = None,
    progress: Progress | None = None,
    sequential: bool = False,
    sequential_layers: int = 1,
    offload_dir: str | Path | None = None,
    host_budget: int | str | None = None,
    distributed: bool | None = None,
) -> PatternStore:
    """Profile `model` on `tasks` ({name: source}) and return (and, with `out`, save) the store.

    `model` is a checkpoint folder or hub id, or an already-loaded transformers model (then pass
    its `tokenizer`). If `out` is an existing store of the same model, the tasks are added to it
    (a task of the same name is replaced) and the index is rebuilt; `overwrite` replaces the
    whole store instead. `metrics` default to ``("tcess",)`` (or the store's), `threshold` to 0
    (or the store's). Key options (`key` router_input|tcess, `search` knn|centroid, `knn`,
    `index` auto|flat|hnsw) default to the store's or router_input/knn/15/auto. Everything that
    can be wrong with the inputs is checked before the model runs; a failure leaves `out` as it
    was.

    Scale-out (`premoe.profile.distributed.profile_corpora`): `sequential` runs one group of
    `sequential_layers` decoder layers on the device at a time, activations on the host up to
    `host_budget` then under `offload_dir`; under torchrun / accelerate launch (`distributed`
    None: auto) each rank profiles a shard of every task and rank 0 alone writes `out`.
    """

    check_options(
        sequential=sequential,
        sequential_layers=sequential_layers,
        device_map=device_map,
        host_budget=host_budget,
        offload_dir=offload_dir,
    )
    if not tasks:
        raise UsageError("give at least one task (--task NAME=SOURCE)")
    for name in tasks:
        check_task_name(name)
    out_path = Path(out) if out is not None else None
    existing = _existing_store(out_path, overwrite) if out_path is not None else None
    handle = ModelHandle(model, tokenizer)
    if out_path is not None:
        _check_out(out_path, overwrite, handle.path, tasks)
    if existing is not None:
        existing.check_model(handle.fingerprint)
    chosen, r = _merge_options(existing, metrics, threshold)
    layer0 = handle.arch.moe_layer_ids(handle.config)[0]
    base = existing.key if existing is not None else key_spec(layer=layer0)
    spec = key_spec(
        key or base["kind"],
        layer0,
        search or base["search"],
        knn if knn is not None else base.get("k", DEFAULT_KNN),
        index or base.get("index", "auto"),
        bool(base.get("center", False)),
    )
    max_length = _max_length(existing, tasks, max_length, handle.config)
    corpora = {
        name: load_task(
            name,
            source,
            handle.tokenizer,
            text_field=text_field,
            max_samples=max_samples,
            max_tokens=max_tokens,
            max_length=max_length,
            seed=seed,
        )
        for name, source in tasks.items()
    }
    run = profile_corpora(
        handle,
        corpora,
        metrics=chosen,
        threshold=r,
        batch_size=batch_size,
        progress=progress,
        device=device,
        dtype=dtype,
        device_map=device_map,
        sequential=sequential,
        sequential_layers=sequential_layers,
        offload_dir=offload_dir,
        host_budget=host_budget,
        distributed=distributed,
    )
    recorded = run.recorded
    if existing is not None:
        store = existing.with_key(  # indexed below, once the new tasks are in
            spec["kind"], spec["search"], spec["k"], spec["index"], spec["center"], build=False
        )
    else:
        store = PatternStore(handle.fingerprint, chosen, spec, metric_options={"threshold": r})
    dtype_used = run.dtype
    for name, rec in recorded.items():
        corpus = corpora[name]
        info = TaskInfo(
            source=corpus.source,
            samples=corpus.samples,
            tokens=corpus.tokens,
            created=created_now(),
            options={**corpus.options, "dtype": dtype_used},
        )
        store.add_task(
            name, info, rec.sums, {k: v.numpy() for k, v in rec.keys.items()}, rebuild=False
        )
    store.build_index()
    if out_path is not None and run.writer:  # data-parallel: rank 0 alone writes
        store.save(out_path, overwrite=overwrite or existing is not None, merge=not overwrite)
    return store
