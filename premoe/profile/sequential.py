"""Layer-sequential profiling (GPTQ-style): one decoder layer (or a few) on the device at a time.

`run_profile_sequential` gives the same per-task sums and keys as `profiler.run_profile` on the
same batches, with peak device memory of about one layer group plus one batch's activations:

1. **Capture.** The embeddings (and every other parameter of the decoder stack outside its
   layers) are put on the device, and each padded batch runs through `model.model` with the
   decoder layers swapped for catchers (GPTQ's ``Catcher``): each catcher records the arguments
   its layer would get (hidden states for the first one; for all of them the keyword arguments:
   attention mask, position embeddings, position ids, cache position...) and passes the hidden
   states on; the catcher of the last layer needed raises a private exception that stops the
   forward. Per-layer recording (not only layer 0's, as GPTQ does) is what makes hybrid families
   work: gpt-oss, Qwen3-Next, MiniMax or Jamba pass each layer the mask of its own layer type.
   Values shared by several layers (one position-embedding tuple, one mask per type) are stored
   once. The embeddings then leave the device.
2. **Replay.** For each group of ``layers_at_once`` consecutive layers (up to the last MoE layer;
   later layers cannot change any score): the group is loaded onto the device, every batch of
   every task is run through it with its recorded arguments, and its output replaces its input
   in the activation store; the group then leaves the device. The routers' hooks are a
   `RoutingRecorder` per task, attached while that task's batches run, told each batch's padding
   mask (`start_batch`) exactly as in the normal mode.
3. **Activations** live on the host (pinned when the device is CUDA, copied without blocking the
   host) while they fit ``host_budget`` bytes; beyond it they are written to ``offload_dir`` as
   safetensors files (no pickle) and read back per group.

Weights come either from the checkpoint (a folder or `ModelSource`: the model is a skeleton on
the meta device and each layer's tensors are read with `CheckpointReader` when the layer is
loaded, so the full model exists neither on the device nor on the host) or from an already
loaded host model (each layer's tensors are copied to the device and dropped afterwards).

Shape legend: B batch, S padded sequence length, H hidden size, L MoE layers, E experts,
N samples, D key dim.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from premoe.arch.model import decoder_layers, decoder_stack
from premoe.arch.spec import ArchSpec
from premoe.errors import UnsupportedArchitectureError, UsageError
from premoe.policy import human_bytes
from premoe.profile.activations import ActivationStore, flatten, unflatten  # noqa: F401
from premoe.profile.corpus import TaskCorpus
from premoe.profile.hooks import Recorded, RoutingRecorder
from premoe.profile.profiler import (
    Progress,
    ProgressInfo,
    accumulated_rows,
    in_corpus_order,
    iter_batches,
    pad_token_id,
)
from premoe.profile.weights import (  # noqa: F401  (re-exported)
    CheckpointWeights,
    LayerWeights,
    ModuleWeights,
)
from premoe.runtime import resolve_device
from premoe.source import ModelSource, resolve_model

log = logging.getLogger(__name__)

HOST_BUDGET_SHARE = 0.5
"""Default host budget for activations: this share of the host memory available at the start."""


def default_host_budget() -> int:
    import psutil

    return int(psutil.virtual_memory().available * HOST_BUDGET_SHARE)


# ---- capture: the inputs every decoder layer gets ------------------------------------------------


class _StopForward(Exception):
    """Raised by the last catcher: nothing after it needs to run."""


class _Recording:
    """What the catchers of one batch saw: layer-0 hidden states and each layer's arguments."""

    def __init__(self, stop: int) -> None:
        self.stop = stop
        self.hidden: torch.Tensor | None = None  # [B, S, H]
        self.values: list[Any] = []  # unique argument values, in first-seen order
        self._ids: dict[int, int] = {}
        self._keep_alive: list[Any] = []
        self.layer_args: dict[int, tuple[list[int], dict[str, int]]] = {}

    def _slot(self, value: Any) -> int:
        slot = self._ids.get(id(value))
        if slot is None:
            slot = len(self.values)
            self._ids[id(value)] = slot
            self.values.append(value)
            self._keep_alive.append(value)  # ids stay unique while recording
        return slot

    def record(self, layer: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.hidden is None:
            self.hidden = args[0]
        self.layer_args[layer] = (
            [self._slot(a) for a in args[1:]],
            {k: self._slot(v) for k, v in kwargs.items()},
        )


class _Catcher(nn.Module):
    """Stands in for decoder layer `layer` during capture (GPTQ's Catcher, for every layer)."""

    def __init__(self, layer: int, recording: _Recording) -> None:
        super().__init__()
        self.layer = layer
        self.recording = recording

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.recording.record(self.layer, (hidden_states, *args), kwargs)
        if self.layer == self.recording.stop:
            raise _StopForward
        return hidden_states


@dataclass
class _Batch:
    """One padded batch of one task, as the replay needs it."""

    task: str
    index: int
    mask: torch.Tensor  # [B, S] long, host
    sel: list[int]  # corpus sample indices of the rows
    tokens: int  # real tokens
    ids: torch.Tensor | None = None  # [B, S] long, host, until the capture has used it
    spec: Any = None  # the unique argument values, tensors taken out (`flatten`)
    layer_args: dict[int, tuple[list[int], dict[str, int]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.task}/{self.index}"


def capture_batch(
    model: Any, arch: ArchSpec, ids: torch.Tensor, mask: torch.Tensor, stop: int
) -> _Recording:
    """Run the decoder stack on one batch up to decoder layer `stop` with every layer replaced
    by a catcher; return what layers 0..`stop` would receive."""
    stack = decoder_stack(model, arch)
    layers = decoder_layers(model, arch)
    originals = [layers[i] for i in range(stop + 1)]
    recording = _Recording(stop)
    for i in range(stop + 1):
        layers[i] = _Catcher(i, recording)
    try:
        stack(input_ids=ids, attention_mask=mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if recording.hidden is None or len(recording.layer_args) != stop + 1:
        raise UnsupportedArchitectureError(
            "the decoder stack did not call its layers one after the other; profile this model "
            "without --sequential"
        )
    return recording


# ---- the run -------------------------------------------------------------------------------------


@dataclass
class SequentialStats:
    """What a sequential run did (and how much memory it needed)."""

    device: str
    dtype: str
    layers_at_once: int
    layer_groups: int
    layers_run: int  # decoder layers up to the last MoE layer
    batches: int
    tokens: int  # real tokens, all tasks
    seconds: float  # capture + replay, weight loading included
    load_seconds: float  # of which putting weights on the device
    model_bytes: int  # all parameters of the model
    activation_bytes: int  # host + disk
    spilled_bytes: int  # of which on disk
    peak_device_bytes: int | None  # CUDA only: torch.cuda.max_memory_allocated during the run

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["tokens_per_s"] = self.tokens_per_s
        return out


@dataclass
class SequentialRun:
    recorded: dict[str, Recorded]  # task -> sums and keys (corpus order)
    dtype: str
    stats: SequentialStats


def weights_for(
    model: Any, device: torch.device, dtype: Any
) -> tuple[LayerWeights, ModelSource | None]:
    """(weights, source to close) for a path / hub id / `ModelSource` / loaded model."""
    if isinstance(model, LayerWeights):
        return model, None
    if isinstance(model, nn.Module):
        return ModuleWeights(model, device), None
    if isinstance(model, ModelSource):
        return CheckpointWeights(model, device, dtype), None

    src = resolve_model(model)
    try:
        return CheckpointWeights(src, device, dtype), src
    except BaseException:
        src.close()
        raise


@contextmanager
def opened_weights(model: Any, device: str | torch.device, dtype: Any) -> Iterator[LayerWeights]:
    """`weights_for(model)` on `device` (a bare ``cuda``: the current one), closed after, with
    the source it opened."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    weights, owned = weights_for(model, dev, dtype)
    try:
        yield weights
    finally:
        if weights is not model:
            weights.close()
        if owned is not None:
            owned.close()


def run_profile_sequential(
    model: Any,
    arch: ArchSpec,
    corpora: Mapping[str, TaskCorpus],
    *,
    tokenizer: Any,
    metrics: list[str],
    threshold: float = 0.0,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    layers_at_once: int = 1,
    offload_dir: str | Path | None = None,
    host_budget: int | None = None,
    progress: Progress | None = None,
) -> SequentialRun:
    """`run_profile`, one group of `layers_at_once` decoder layers on `device` at a time.

    `model`: a checkpoint folder, hub id or `ModelSource` (weights read layer by layer from the
    checkpoint; `dtype` as in `from_pretrained`), a transformers model already loaded on the
    host (its layers are copied to `device` one group at a time), or a `LayerWeights` (whose
    device is used). Activations stay on the host up to `host_budget` bytes (default: half the
    available host memory), then go to files under `offload_dir` (a private subfolder, removed
    at the end).
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if layers_at_once < 1:
        raise UsageError(f"--sequential-layers must be >= 1, got {layers_at_once}")
    budget = default_host_budget() if host_budget is None else int(host_budget)
    with opened_weights(model, device, dtype) as weights:
        return _run(
            weights,
            arch,
            corpora,
            tokenizer=tokenizer,
            metrics=metrics,
            threshold=threshold,
            batch_size=batch_size,
            layers_at_once=layers_at_once,
            offload_dir=offload_dir,
            budget=budget,
            progress=progress,
        )


def _run(
    weights: LayerWeights,
    arch: ArchSpec,
    corpora: Mapping[str, TaskCorpus],
    *,
    tokenizer: Any,
    metrics: list[str],
    threshold: float,
    batch_size: int,
    layers_at_once: int,
    offload_dir: str | Path | None,
    budget: int,
    progress: Progress | None,
) -> SequentialRun:
    net, dev = weights.model, weights.device
    config = net.config
    moe = arch.moe_layer_ids(config)
    stop = max(moe)  # later layers cannot change any score
    layers = decoder_layers(net, arch)
    groups = [
        list(range(s, min(s + layers_at_once, stop + 1)))
        for s in range(0, stop + 1, layers_at_once)
    ]
    pad_id = pad_token_id(tokenizer, config)
    cuda = dev.type == "cuda"
    hidden = int(config.hidden_size)
    elt = next(p for p in net.parameters() if p.is_floating_point()).element_size()
    rows = accumulated_rows(metrics)

    batches: dict[str, list[_Batch]] = {}
    estimate = 0
    for name, corpus in corpora.items():
        batches[name] = []
        for i, (ids, mask, sel) in enumerate(iter_batches(corpus.token_ids, batch_size, pad_id)):
            tokens = sum(len(corpus.token_ids[j]) for j in sel)
            mask = mask.pin_memory() if cuda else mask
            batches[name].append(_Batch(name, i, mask, sel, tokens, ids=ids))
            estimate += ids.numel() * hidden * elt  # [B, S, H]
    if estimate > budget and offload_dir is None:
        raise UsageError(
            f"the activations of all batches need about {human_bytes(estimate)}, more than the "
            f"host budget of {human_bytes(budget)}; pass --offload-dir DIR (or raise "
            "--host-budget, or profile fewer tokens)"
        )
    total_tokens = sum(b.tokens for bs in batches.values() for b in bs)
    total_samples = sum(c.samples for c in corpora.values())
    n_batches = sum(len(bs) for bs in batches.values())
    log.info(
        "sequential profiling: %d layers in %d group(s), %d batches, activations ~%s on %s",
        stop + 1,
        len(groups),
        n_batches,
        human_bytes(estimate),
        dev,
    )
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    recorders = {name: RoutingRecorder(net, arch, rows, threshold) for name in corpora}
    store = ActivationStore(dev, budget, offload_dir)
    try:
        with torch.no_grad():
            # 1. capture every layer's inputs, embeddings on the device
            prefix = weights.prefix_modules()
            weights.bring(prefix)
            weights.prefetch([layers[i] for i in groups[0]])  # read while capturing
            for name in corpora:
                for batch in batches[name]:
                    assert batch.ids is not None
                    ids = (batch.ids.pin_memory() if cuda else batch.ids).to(dev, non_blocking=True)
                    batch.ids = None  # the host copy is not needed again
                    mask_dev = batch.mask.to(dev, non_blocking=True)
                    rec = capture_batch(net, arch, ids, mask_dev, stop)
                    assert rec.hidden is not None
                    store.put(f"h/{batch.name}", [rec.hidden])
                    leaves, batch.spec = flatten(rec.values)
                    batch.layer_args = rec.layer_args
                    store.put(f"a/{batch.name}", leaves)
                    del rec, leaves
            weights.release(prefix)

            # 2. replay, one group of layers at a time
            done_units = 0
            units = len(groups) * total_samples
            for gi, group in enumerate(groups):
                mods = [layers[i] for i in group]
                weights.bring(mods)
                if gi + 1 < len(groups):  # read the next group while this one runs
                    weights.prefetch([layers[i] for i in groups[gi + 1]])
                for name in corpora:
                    rec = recorders[name]
                    rec.attach()
                    try:
                        for batch in batches[name]:
                            h = store.get(f"h/{batch.name}")[0]
                            values = unflatten(batch.spec, store.get(f"a/{batch.name}"))
                            rec.start_batch(batch.mask.to(dev, non_blocking=True))
                            for li in group:
                                pos, kw = batch.layer_args[li]
                                out = layers[li](
                                    h,
                                    *[values[s] for s in pos],
                                    **{k: values[s] for k, s in kw.items()},
                                )
                                h = out[0] if isinstance(out, (tuple, list)) else out
                            store.put(f"h/{batch.name}", [h])
                            del h, values
                            done_units += len(batch.sel)
                            if progress is not None:
                                # whole-model equivalents: samples and tokens x share of layers
                                elapsed = max(time.perf_counter() - t0, 1e-9)
                                eff = total_tokens * done_units // max(units, 1)
                                samples = done_units // len(groups)
                                progress(
                                    ProgressInfo(name, samples, total_samples, eff, eff / elapsed)
                                )
                    finally:
                        rec.detach()
                weights.release(mods)
                log.debug("layer group %d/%d done", gi + 1, len(groups))
        out: dict[str, Recorded] = {}
        for name in corpora:
            order = [i for b in batches[name] for i in b.sel]
            out[name] = in_corpus_order(recorders[name].collect(), order)
        if cuda:
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        peak = int(torch.cuda.max_memory_allocated(dev)) if cuda else None
        dtype = next(p for p in net.parameters() if p.is_floating_point()).dtype
        stats = SequentialStats(
            device=str(dev),
            dtype=str(dtype).removeprefix("torch."),
            layers_at_once=layers_at_once,
            layer_groups=len(groups),
            layers_run=stop + 1,
            batches=n_batches,
            tokens=total_tokens,
            seconds=seconds,
            load_seconds=weights.load_seconds,
            model_bytes=weights.model_bytes(),
            activation_bytes=store.host_bytes + store.disk_bytes,
            spilled_bytes=store.disk_bytes,
            peak_device_bytes=peak,
        )
        log.info(
            "sequential profiling done: %.1f s (%.1f s loading weights), %.0f tokens/s%s",
            seconds,
            weights.load_seconds,
            stats.tokens_per_s,
            f", peak device memory {human_bytes(peak)}" if peak is not None else "",
        )
        return SequentialRun(out, stats.dtype, stats)
    finally:
        store.close()


__all__ = [
    "ActivationStore",
    "CheckpointWeights",
    "LayerWeights",
    "ModuleWeights",
    "SequentialRun",
    "SequentialStats",
    "capture_batch",
    "run_profile_sequential",
    "opened_weights",
    "weights_for",
]
