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
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from premoe.arch import arch_for_config
from premoe.arch.keys import ExpertKey, RouterKey
from premoe.arch.model import decoder_layers, decoder_stack
from premoe.arch.spec import ArchSpec
from premoe.errors import CheckpointError, UnsupportedArchitectureError, UsageError
from premoe.load.loader import (
    Copier,
    ExpertIO,
    build_skeleton,
    layer_of,
    materialize,
    read_plain,
    tensor_of,
)
from premoe.policy import human_bytes
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
from premoe.runtime import resolve_device, resolve_dtype
from premoe.source import ModelSource, resolve_model

log = logging.getLogger(__name__)

READ_THREADS = 4
"""Worker threads reading checkpoint tensors into host memory (`CheckpointWeights`)."""
HOST_BUDGET_SHARE = 0.5
"""Default host budget for activations: this share of the host memory available at the start."""


def default_host_budget() -> int:
    import psutil

    return int(psutil.virtual_memory().available * HOST_BUDGET_SHARE)


# ---- nested values (keyword arguments of a decoder layer) ---------------------------------------


class _Leaf:
    """Marks where a tensor was in a flattened value."""

    __slots__ = ()


_LEAF = _Leaf()


def _map_leaves(value: Any, is_leaf: Callable[[Any], bool], fn: Callable[[Any], Any]) -> Any:
    """`value` with each leaf (`is_leaf`) replaced by `fn(leaf)`, in depth-first order, through
    tuples (named ones too), lists and dicts; anything else is kept as it is."""

    def go(v: Any) -> Any:
        if is_leaf(v):
            return fn(v)
        if isinstance(v, tuple) and hasattr(v, "_fields"):  # named tuple
            return type(v)(*[go(x) for x in v])
        if isinstance(v, (tuple, list)):
            return type(v)(go(x) for x in v)
        if isinstance(v, dict):
            return {k: go(x) for k, x in v.items()}
        return v

    return go(value)


def flatten(value: Any) -> tuple[list[torch.Tensor], Any]:
    """(tensors, spec): `value` (a tensor, a tuple/list/dict of them, or anything else) with its
    tensors taken out; `unflatten(spec, tensors)` puts them back."""
    leaves: list[torch.Tensor] = []

    def take(t: torch.Tensor) -> _Leaf:
        leaves.append(t)
        return _LEAF

    spec = _map_leaves(value, lambda v: isinstance(v, torch.Tensor), take)
    return leaves, spec


def unflatten(spec: Any, leaves: Iterable[torch.Tensor]) -> Any:
    it = iter(leaves)
    return _map_leaves(spec, lambda v: v is _LEAF, lambda _: next(it))


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- activation store: host (pinned) first, then disk -------------------------------------------


class ActivationStore:
    """Named lists of tensors kept on the host while they fit `budget` bytes, else on disk.

    A name keeps its place once chosen (host or disk). On CUDA, host copies go to pinned buffers
    that are reused in place when the same name is stored again with the same shapes, copied
    without blocking (stream order makes a later `get` see them). On the CPU the tensors are kept
    as they are (no copy).
    """

    def __init__(
        self, device: torch.device, budget: int, offload_dir: str | Path | None = None
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.budget = int(budget)
        self.offload_dir = Path(offload_dir) if offload_dir is not None else None
        self._host: dict[str, list[torch.Tensor]] = {}
        self._disk: dict[str, Path] = {}
        self._tmp: Path | None = None
        self.host_bytes = 0
        self.disk_bytes = 0
        self.bytes_written = 0  # to disk, all puts
        self.bytes_read = 0  # from disk, all gets

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._host.clear()
        self._disk.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _folder(self) -> Path:
        if self._tmp is None:
            assert self.offload_dir is not None
            self.offload_dir.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix="premoe-activations-", dir=self.offload_dir))
        return self._tmp

    def put(self, name: str, tensors: Sequence[torch.Tensor]) -> None:
        nbytes = _nbytes(tensors)
        if name in self._host:
            self._put_host(name, tensors)
        elif name in self._disk:
            self._put_disk(name, tensors)
        elif self.host_bytes + nbytes <= self.budget:
            self.host_bytes += nbytes
            self._put_host(name, tensors)
        elif self.offload_dir is not None:
            self.disk_bytes += nbytes
            self._disk[name] = self._folder() / f"{len(self._disk)}.safetensors"
            self._put_disk(name, tensors)
        else:
            raise UsageError(
                f"activations exceed the host budget of {human_bytes(self.budget)}; pass "
                "--offload-dir DIR to spill them to disk, or raise --host-budget"
            )

    def _put_host(self, name: str, tensors: Sequence[torch.Tensor]) -> None:
        if not self.cuda:
            self._host[name] = [t if t.device.type == "cpu" else t.cpu() for t in tensors]
            return
        old = self._host.get(name)
        same = old is not None and [(o.shape, o.dtype) for o in old] == [
            (t.shape, t.dtype) for t in tensors
        ]
        if not same:
            old = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            self._host[name] = old
        assert old is not None
        for dst, src in zip(old, tensors, strict=True):
            dst.copy_(src, non_blocking=True)

    def _put_disk(self, name: str, tensors: Sequence[torch.Tensor]) -> None:
        from safetensors.torch import save_file

        data = {str(i): t.detach().to("cpu").contiguous() for i, t in enumerate(tensors)}
        save_file(data, str(self._disk[name]))
        self.bytes_written += _nbytes(data.values())

    def get(self, name: str) -> list[torch.Tensor]:
        """The tensors of `name` on the store's device."""
        if name in self._host:
            return [t.to(self.device, non_blocking=True) for t in self._host[name]]
        from safetensors import safe_open

        with safe_open(str(self._disk[name]), framework="pt") as f:
            out = [f.get_tensor(str(i)) for i in range(len(f.keys()))]
        self.bytes_read += _nbytes(out)
        return [t.to(self.device) for t in out]


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


# ---- where the weights come from ----------------------------------------------------------------


class LayerWeights:
    """Puts parts of the model on the compute device and takes them off again."""

    model: Any
    arch: ArchSpec
    device: torch.device
    load_seconds: float = 0.0

    def prefetch(self, modules: Sequence[nn.Module]) -> None:
        """Hint: `modules` will be brought in next (start reading them)."""

    def close(self) -> None:
        """Stop background work."""

    def prefix_modules(self) -> list[nn.Module]:
        """Modules of the decoder stack outside its layers (embeddings, rotary, norm...)."""
        stack, layers = decoder_stack(self.model, self.arch), decoder_layers(self.model, self.arch)
        return [m for m in stack.children() if m is not layers]

    def bring(self, modules: Sequence[nn.Module]) -> None:
        raise NotImplementedError

    def release(self, modules: Sequence[nn.Module]) -> None:
        raise NotImplementedError

    def model_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total


class ModuleWeights(LayerWeights):
    """An already-loaded model (on the host): tensors are copied to the device per module and
    the device copies dropped afterwards (the host tensors are never modified)."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model = model
        self.arch = arch_for_config(model.config)
        self.device = device
        self._saved: dict[int, list[tuple[Any, str, str, torch.Tensor]]] = {}

    def bring(self, modules: Sequence[nn.Module]) -> None:
        t0 = time.perf_counter()
        for top in modules:
            saved: list[tuple[Any, str, str, torch.Tensor]] = []
            for mod in top.modules():
                for kind in ("_parameters", "_buffers"):
                    for name, t in getattr(mod, kind).items():
                        if t is None or t.device == self.device:
                            continue
                        saved.append((mod, kind, name, t))
                        moved = t.data.to(self.device, non_blocking=True)
                        if kind == "_parameters":
                            getattr(mod, kind)[name] = nn.Parameter(moved, requires_grad=False)
                        else:
                            getattr(mod, kind)[name] = moved
            self._saved[id(top)] = saved
        self.load_seconds += time.perf_counter() - t0

    def release(self, modules: Sequence[nn.Module]) -> None:
        for top in modules:
            for mod, kind, name, t in self._saved.pop(id(top), []):
                getattr(mod, kind)[name] = t


class CheckpointWeights(LayerWeights):
    """A skeleton on the meta device filled from the checkpoint one module at a time.

    Parameters are allocated on the device (in the dtype `from_pretrained` would use, fp32 where
    the model keeps modules in fp32) and read with the source's `CheckpointReader` in the fused
    in-memory layout (`premoe.load.loader.ExpertIO`); after `release` they are meta again.
    Reading is done by worker threads into (pinned) host buffers, one tensor per job, so that
    `prefetch` of the next group overlaps the device's work on the current one; `bring` then only
    issues asynchronous host-to-device copies.
    """

    def __init__(self, src: ModelSource, device: torch.device, dtype: Any) -> None:

        self.src = src
        self.arch = src.arch
        self.device = device
        self.dtype = resolve_dtype(dtype, src)
        self.model = build_skeleton(src.config, self.dtype).eval()
        self.io = ExpertIO(src)
        self.copier = Copier(device)
        self._pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="premoe-read")
        self._pending: dict[int, list[Future[tuple[str, torch.Tensor]]]] = {}
        self._plan()

    def _plan(self) -> None:
        """id(module) -> [(checkpoint key, tensor name relative to the module)]: modules are the
        decoder layers and the other children of the decoder stack (embeddings, norm)."""

        km, reader = self.src.keymap, self.src.reader
        stack = decoder_stack(self.model, self.arch)
        layers = decoder_layers(self.model, self.arch)
        state = self.model.state_dict(keep_vars=True)
        tied = dict(getattr(self.model, "all_tied_weights_keys", None) or {})
        self.reads: dict[int, list[tuple[str, str]]] = {}
        unused: list[str] = []

        def add(module: nn.Module, key: str, rel: str) -> None:
            self.reads.setdefault(id(module), []).append((key, rel))

        for key in reader.keys():
            role = km.role(key)
            if isinstance(role, ExpertKey) or (role is not None and km.is_mtp(role.layer)):
                continue  # experts: read by `ExpertIO` when the layer is brought in
            if isinstance(role, RouterKey):
                add(layers[role.layer], key, role.tensor.memory)
                continue
            target, _ = km.plain_target(key)
            if target is None:
                continue  # a quantization companion: read with its weight
            layer = layer_of(key, km.prefix)
            if layer is not None:
                if layer < len(layers):  # (DeepSeek-V3's MTP layer is not in the model)
                    add(layers[layer], key, target[len(km.prefix) + len(str(layer)) + 2 :])
                else:
                    unused.append(key)
                continue
            name = target
            source = tied.get(name)
            if source is not None and source not in reader:
                name = source  # a tied head saved in place of its source (the embeddings)
            child, _, rel = name.removeprefix("model.").partition(".")
            if name not in state or not name.startswith("model.") or not rel:
                unused.append(key)  # the output head (never needed) or foreign tensors
                continue
            add(stack.get_submodule(child), key, rel)
        if unused:
            log.debug("%d checkpoint tensors not needed, e.g. %s", len(unused), unused[0])

    def _layer_index(self, module: nn.Module) -> int | None:
        for i, layer in enumerate(decoder_layers(self.model, self.arch)):
            if layer is module:
                return i
        return None

    # -- host side: read a module's tensors into (pinned) host memory, in worker threads --------
    def _host_jobs(self, module: nn.Module) -> list[Callable[[], tuple[str, torch.Tensor]]]:
        """One job per tensor of `module`: each returns (name relative to the module, host
        tensor shaped like the model's tensor, in its dtype; pinned when the device is CUDA).
        Fused expert parameters are assembled whole in the in-memory layout."""

        pin = self.copier.cuda
        jobs: list[Callable[[], tuple[str, torch.Tensor]]] = []

        def plain(key: str, rel: str) -> tuple[str, torch.Tensor]:
            like = tensor_of(module, rel)  # meta parameter or host buffer
            src = read_plain(self.src, key)
            if tuple(src.shape) != tuple(like.shape):
                raise CheckpointError(
                    f"{key}: checkpoint shape {tuple(src.shape)} does not match the model's "
                    f"{tuple(like.shape)}; is config.json the one the checkpoint was saved with?"
                )
            host = torch.empty(like.shape, dtype=like.dtype, pin_memory=pin)
            host.copy_(src)
            return rel, host

        for key, rel in self.reads.get(id(module), []):
            jobs.append(lambda key=key, rel=rel: plain(key, rel))
        layer = self._layer_index(module)
        if layer is not None and layer in self.src.moe_layers:
            e = self.src.num_experts
            for ti, t in enumerate(self.src.arch.experts):

                def experts(ti: int = ti, t: Any = t) -> tuple[str, torch.Tensor]:
                    like = tensor_of(module, t.memory)  # meta [E, ...]
                    host = torch.empty(like.shape, dtype=like.dtype, pin_memory=pin)
                    self.io.check_shape(layer, ti, host.shape[1:])
                    for ex, off, piece in self.io.pieces(layer, ti, range(e)):
                        host[ex].narrow(0, off, piece.shape[0]).copy_(piece)
                    return t.memory, host

                jobs.append(experts)
        return jobs

    def prefetch(self, modules: Sequence[nn.Module]) -> None:
        """Start reading `modules` into host memory in the background (for a later `bring`)."""
        for mod in modules:
            if id(mod) not in self._pending:
                self._pending[id(mod)] = [self._pool.submit(job) for job in self._host_jobs(mod)]

    def close(self) -> None:
        for futures in self._pending.values():
            for f in futures:
                f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def bring(self, modules: Sequence[nn.Module]) -> None:

        t0 = time.perf_counter()
        self.prefetch(modules)  # (already running if the caller asked for it earlier)
        wanted = {id(p) for m in modules for p in m.parameters()}
        with torch.no_grad():
            materialize(self.model, self.device, self.dtype, only=wanted)
            if self.copier.cuda:  # the reused memory may still be read by the compute stream
                self.copier.stream.wait_stream(torch.cuda.current_stream(self.device))
            filled: set[int] = set()
            for mod in modules:
                for future in self._pending.pop(id(mod)):
                    rel, host = future.result()
                    dst = tensor_of(mod, rel)
                    self.copier.copy(dst, host)  # pinned, same dtype: asynchronous
                    filled.add(id(dst))
            self.copier.finish(blocking=False)
        missing = [n for m in modules for n, p in m.named_parameters() if id(p) not in filled]
        if missing:
            raise CheckpointError(
                f"checkpoint {self.src.path} has no tensor for {len(missing)} parameter(s), e.g. "
                f"{missing[0]!r}; is it complete, and for this config.json?"
            )
        self.load_seconds += time.perf_counter() - t0

    def release(self, modules: Sequence[nn.Module]) -> None:
        for top in modules:
            for mod in top.modules():
                for name, p in list(mod._parameters.items()):
                    if p is not None and p.device.type != "meta":
                        mod._parameters[name] = nn.Parameter(
                            torch.empty(p.shape, dtype=p.dtype, device="meta"),
                            requires_grad=False,
                        )


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


def _weights_for(
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
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    budget = default_host_budget() if host_budget is None else int(host_budget)
    weights, owned = _weights_for(model, dev, dtype)
    try:
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
    finally:
        if weights is not model:
            weights.close()
        if owned is not None:
            owned.close()


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
]
