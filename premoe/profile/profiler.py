"""`profile()`: run a model over task corpora and write per-task expert-usage patterns.

The model runs in padded batches (right padding, attention mask; padding tokens never count)
with hooks only on the routers (`hooks.RoutingRecorder`); every requested metric comes from the
same pass, and per-sample routing keys for both key kinds are taken along the way. Only the
decoder (`model.model`) runs: the LM head is never computed, since no metric needs it.

Shape legend: B batch, S padded sequence length, L MoE layers, E experts, N samples, D key dim.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from premoe.arch import ArchSpec, arch_for_config
from premoe.batching import (  # noqa: F401  (re-exported)
    input_device,
    iter_batches,
    pad_batch,
    pad_token_id,
)
from premoe.errors import StoreError, UsageError
from premoe.fingerprint import fingerprint_model, fingerprint_source
from premoe.io.atomic import check_not_input, check_writable, is_premoe_output, refuse_existing
from premoe.patterns.store import (
    DEFAULT_KNN,
    PatternStore,
    TaskInfo,
    created_now,
    key_spec,
)
from premoe.profile.corpus import TaskCorpus, check_task_name, load_task
from premoe.profile.hooks import Recorded, RoutingRecorder
from premoe.profile.metrics import DEFAULT_METRIC, check_metrics, check_threshold
from premoe.runtime import parse_dtype, resolve_device
from premoe.source import load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 512


@dataclass
class ProgressInfo:
    """Progress of a profiling run, reported after every batch."""

    task: str
    samples: int  # samples done, all tasks so far
    total_samples: int  # samples of all tasks
    tokens: int  # real (non-padding) tokens done
    tokens_per_s: float


Progress = Callable[[ProgressInfo], None]


def _is_model(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module) and hasattr(obj, "config")


class ModelHandle:
    """A model to profile: fingerprint and tokenizer at once, weights when `load()` is called."""

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        self.path: Path | None = None
        self._model: Any = None
        if _is_model(model):
            self._model = model
            self.config = model.config
            self.arch: ArchSpec = arch_for_config(model.config)
            self.fingerprint = fingerprint_model(model, self.arch)
            if tokenizer is None:
                raise UsageError("pass the tokenizer with an already-loaded model")
        else:
            from premoe.source import resolve_model

            src = resolve_model(model)
            try:
                self.path, self.config, self.arch = src.path, src.config, src.arch
                self.fingerprint = fingerprint_source(src)
            finally:
                src.close()
            if tokenizer is None:
                tokenizer = load_tokenizer(src.path)
        self.tokenizer = tokenizer

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(
        self,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        device_map: str | dict[str, Any] | None = None,
    ) -> Any:
        """The transformers model (loaded from the checkpoint on first call), in eval mode."""
        if self._model is None:
            self._model = load_causal_lm(
                self.path, device=device, dtype=dtype, device_map=device_map
            )
        return self._model


def load_causal_lm(
    path: str | Path | None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: str | dict[str, Any] | None = None,
) -> Any:
    """`AutoModelForCausalLM.from_pretrained` on a device (or an accelerate device map)."""
    from transformers import AutoModelForCausalLM

    if path is None:
        raise UsageError("no model path to load from")
    parsed = parse_dtype(dtype)
    torch_dtype = "auto" if parsed is None else parsed  # auto: transformers reads the checkpoint
    if device_map is None:
        device_map = {"": str(resolve_device(device))}
    elif device_map != "auto" and not isinstance(device_map, dict):
        raise UsageError(f"bad --device-map {device_map!r}; use auto")
    single = isinstance(device_map, dict) and set(device_map) == {""}
    if single and _quantized(path):
        # transformers' quantized kernels need downloads on a GPU; premoe's loader dequantizes
        # every format it declares, on any device (all experts kept: the full model)
        from premoe.load.loader import load_full

        return load_full(path, device=device_map[""], dtype=parsed)
    log.info("loading %s (dtype %s, device map %s)", path, torch_dtype, device_map)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=device_map)
    return model.eval()


def _quantized(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    try:
        return "quantization_config" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def accumulated_rows(metrics: list[str]) -> tuple[str, ...]:
    """Rows the recorder sums for `metrics` (frequency comes from the always-kept counts)."""
    return tuple(m for m in metrics if m != "frequency")


def run_profile(
    model: Any,
    arch: ArchSpec,
    corpora: Mapping[str, TaskCorpus],
    *,
    tokenizer: Any,
    metrics: list[str],
    threshold: float = 0.0,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[str, Recorded]:
    """Run `model` over every task's samples; per task: [L, E] sums and per-sample keys."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    device = input_device(model)
    pad_id = pad_token_id(tokenizer, model.config)
    total = sum(c.samples for c in corpora.values())
    done_samples = done_tokens = 0
    start = time.perf_counter()
    out: dict[str, Recorded] = {}
    rows = accumulated_rows(metrics)
    with torch.inference_mode(), RoutingRecorder(model, arch, rows, threshold) as rec:
        for name, corpus in corpora.items():
            order: list[int] = []
            for ids, mask, sel in iter_batches(
                corpus.token_ids, batch_size, pad_id, pin=device.type == "cuda"
            ):
                ids = ids.to(device, non_blocking=True)
                mask = mask.to(device, non_blocking=True)
                rec.start_batch(mask)
                model.model(input_ids=ids, attention_mask=mask, use_cache=False)
                order.extend(sel)
                done_samples += len(sel)
                done_tokens += sum(len(corpus.token_ids[i]) for i in sel)
                if progress is not None:
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    progress(
                        ProgressInfo(name, done_samples, total, done_tokens, done_tokens / elapsed)
                    )
            out[name] = in_corpus_order(rec.collect(), order)
    return out


def in_corpus_order(recorded: Recorded, order: list[int]) -> Recorded:
    """`recorded` with its per-sample keys [N, D] moved from batch order to corpus order
    (`order[j]`: the corpus index of key row j)."""
    inverse = torch.from_numpy(np.argsort(np.asarray(order)))  # batch order -> corpus order
    recorded.keys = {k: v[inverse] for k, v in recorded.keys.items()}
    return recorded


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
    from premoe.profile.distributed import check_options, profile_corpora

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
