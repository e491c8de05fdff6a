"""Load a pruned model straight from the original checkpoint, reading only the kept experts.

`load_pruned(model, keep)` builds the model of the pruned config (E' = kept experts per layer)
with every parameter on the meta device and every buffer computed on the CPU by the module's own
`__init__` (so rotary `inv_freq` and friends are exactly what `from_pretrained` computes), then
allocates each parameter once on the target device and fills it from the ORIGINAL checkpoint:

- non-MoE tensors (attention, norms, embeddings, dense MLPs, shared experts) by name;
- router tensors (weight rows, logit bias, correction bias) as the kept rows (`get_rows`);
- expert tensors in the fused in-memory layout: slot s of `[E', ...]` holds original expert
  `keep[s]`; per-expert checkpoints are concatenated part by part (`gate_up[s] = cat(gate_e,
  up_e)`), fused ones read row by row. Dropped experts are never read.

The full model is never materialised, on the host or the device: device memory is the pruned
parameters plus the (tiny) buffers; host memory is one tensor at a time plus pinned staging.

Shape legend: E experts in the source, E' kept (slots), H hidden, I expert intermediate size,
R rows of one expert's slice in a fused parameter (2I for gate_up, H for down).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from premoe.arch.keys import ExpertKey, KeyMap, RouterKey, Stored
from premoe.arch.model import layer_of, moe_layer, tensor_of  # noqa: F401  (re-exported)
from premoe.arch.spec import ArchSpec
from premoe.errors import CheckpointError, UsageError
from premoe.io.dense import read_stored
from premoe.prune.config import pruned_config
from premoe.prune.keepsets import GroupPlan, KeepSets
from premoe.runtime import resolve_device, resolve_dtype
from premoe.source import ModelSource, resolve_model

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes done, bytes total)

# ---- options --------------------------------------------------------------------------------


def as_source(model: str | Path | ModelSource) -> tuple[ModelSource, bool]:
    """(source, whether the caller owns it and must close it)."""
    if isinstance(model, ModelSource):
        return model, False
    return resolve_model(model), True


# ---- model skeleton: parameters on meta, buffers computed on the CPU --------------------------


@contextmanager
def _params_on_meta() -> Iterator[None]:
    """While active, every parameter a module registers is moved to the meta device (its CPU
    allocation is freed at once, untouched); buffers stay where `__init__` computed them."""
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            cls = type(param)
            meta = cls(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            self._parameters[name] = meta

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_skeleton(config: Any, dtype: torch.dtype, **kwargs: Any) -> Any:
    """The transformers model of `config`: parameters on meta, buffers real (CPU), tied."""
    from transformers import AutoModelForCausalLM

    with _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    return model


def _fp32_patterns(model: Any, dtype: torch.dtype) -> re.Pattern[str] | None:
    """The `_keep_in_fp32_modules(_strict)` rule of `from_pretrained` as one regex (or None)."""
    get_plan = getattr(model, "_get_dtype_plan", None)
    plan: dict[str, torch.dtype] = get_plan(dtype) if get_plan is not None else {}
    if not plan:
        return None
    return re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in plan))


def materialize(
    model: Any, device: torch.device, dtype: torch.dtype, only: set[int] | None = None
) -> None:
    """Give every meta parameter real (uninitialised) storage on `device`, once per tied group,
    in the dtype `from_pretrained` would use; move buffers to `device`. With `only` (ids of
    parameter objects), the other parameters stay on the meta device."""
    fp32 = _fp32_patterns(model, dtype)
    params: dict[int, nn.Parameter] = {}
    buffers: dict[int, torch.Tensor] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in list(mod._parameters.items()):
            if p is None or (only is not None and id(p) not in only):
                continue
            if id(p) not in params:
                dt = torch.float32 if fp32 is not None and fp32.search(prefix + name) else p.dtype
                new = torch.empty(p.shape, dtype=dt, device=device)
                params[id(p)] = nn.Parameter(new, requires_grad=p.requires_grad)
            mod._parameters[name] = params[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is None:
                continue
            if id(b) not in buffers:
                dt = b.dtype
                persistent = name not in mod._non_persistent_buffers_set
                if persistent and fp32 is not None and fp32.search(prefix + name):
                    dt = torch.float32
                buffers[id(b)] = b.to(device=device, dtype=dt)
            mod._buffers[name] = buffers[id(b)]


# ---- host -> device copies ---------------------------------------------------------------------


class Copier:
    """Host-to-device copies into existing device tensors (in place).

    On CPU it is `dst.copy_(src)`. On CUDA the copies run on a side stream that first waits for
    the compute stream; a pinned source of the right dtype is copied directly (asynchronously),
    anything else is first converted into a ring of pinned staging buffers, so that the host-side
    read (page cache -> pinned) of one piece overlaps the transfer of the previous one.
    `finish()` makes the compute stream wait for the copies (and, if `blocking`, the host too).
    """

    def __init__(
        self, device: torch.device, *, chunk_bytes: int = 64 << 20, n_chunks: int = 3
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.bytes = 0
        if self.cuda:
            self.stream = torch.cuda.Stream(device=device)
            self.stream.wait_stream(torch.cuda.current_stream(device))
            self._chunk = chunk_bytes
            self._ring: list[torch.Tensor] = []
            self._events: list[torch.cuda.Event | None] = [None] * n_chunks
            self._n = n_chunks
            self._cur = -1
            self._used = chunk_bytes  # forces a new chunk on first use

    def _stage(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of pinned memory not read by any pending copy (uint8)."""
        if self._used + nbytes > self._chunk:
            if self._cur >= 0:
                ev = torch.cuda.Event()
                ev.record(self.stream)
                self._events[self._cur] = ev
            self._cur = (self._cur + 1) % self._n
            if self._cur >= len(self._ring):
                self._ring.append(torch.empty(self._chunk, dtype=torch.uint8, pin_memory=True))
            pending = self._events[self._cur]
            if pending is not None:
                pending.synchronize()
            self._used = 0
        out = self._ring[self._cur][self._used : self._used + nbytes]
        self._used += (nbytes + 511) // 512 * 512
        return out

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> int:
        """Copy host `src` into device `dst` (same shape; dtype converted). Returns bytes moved."""
        if dst.shape != src.shape:
            raise CheckpointError(
                f"tensor shape {tuple(src.shape)} does not match the model's {tuple(dst.shape)}"
            )
        nbytes = dst.numel() * dst.element_size()
        self.bytes += nbytes
        if not self.cuda:
            dst.copy_(src)
            return nbytes
        if src.device.type == "cuda" or (src.is_pinned() and src.dtype == dst.dtype):
            with torch.cuda.stream(self.stream):
                dst.copy_(src, non_blocking=True)
            return nbytes
        flat_dst = dst.view(-1) if dst.is_contiguous() else None
        if flat_dst is None:  # never the case for parameters and their slot slices
            with torch.cuda.stream(self.stream):
                dst.copy_(src.to(dst.dtype).pin_memory(), non_blocking=True)
            return nbytes
        flat_src = src.contiguous().view(-1)
        step = max(1, self._chunk // dst.element_size())
        for start in range(0, flat_dst.numel(), step):
            n = min(step, flat_dst.numel() - start)
            staged = self._stage(n * dst.element_size()).view(dst.dtype)
            staged.copy_(flat_src[start : start + n])
            with torch.cuda.stream(self.stream):
                flat_dst[start : start + n].copy_(staged, non_blocking=True)
        return nbytes

    def run(self, fn: Callable[[], Any]) -> Any:
        """Run device-side work `fn` in stream order with the copies."""
        if not self.cuda:
            return fn()
        with torch.cuda.stream(self.stream):
            return fn()

    def finish(self, *, blocking: bool = True) -> torch.cuda.Event | None:
        """Order the compute stream after the copies; returns the copies' event (CUDA)."""
        if not self.cuda:
            return None
        done = torch.cuda.Event()
        done.record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(done)
        if blocking:
            done.synchronize()
        return done


# ---- experts: where each one lives on disk and in memory ----------------------------------------


class ExpertIO:
    """Reads experts of a source checkpoint in the model's in-memory (fused) layout.

    `pieces(layer, t, experts)` yields `(expert, row_offset, host_tensor)`: for a per-expert
    checkpoint one piece per part (`gate`, `up` at offsets 0 and I), for a fused one the expert's
    whole slice. Only the requested experts' bytes are read. Quantized experts (fp8 block,
    MXFP4, compressed-tensors, GPTQ, AWQ) are dequantized here (`premoe.io.dense`), in fp32.
    """

    def __init__(self, source: ModelSource) -> None:
        self.source = source
        self.arch: ArchSpec = source.arch
        self.keymap: KeyMap = source.keymap
        self.reader = source.reader
        self.num_experts = source.num_experts
        self.quantized = self.keymap.format.quantized

    def _memory_shape(self, stored: Stored) -> tuple[int, ...]:
        shape = stored.dense_shape
        if stored.format.quantized and self.arch.memory_transposed:
            return (*shape[:-2], shape[-1], shape[-2])  # [.., N, K] -> in-memory [.., K, N]
        return shape

    def part_rows(self, layer: int, ti: int) -> list[int]:
        """Rows of each per-expert part of expert tensor `ti` (e.g. [I, I] for gate, up)."""
        t = self.arch.experts[ti]
        return [
            self.keymap.stored(layer, ti, 0, p).dense_shape[0] for p in range(len(t.per_expert))
        ]

    def check_shape(self, layer: int, ti: int, slot_shape: Sequence[int]) -> None:
        """Raise if the checkpoint's expert slice does not fit the model's slot shape."""
        t = self.arch.experts[ti]
        if self.keymap.layout == "per_expert":
            shapes = [
                self.keymap.stored(layer, ti, 0, p).dense_shape for p in range(len(t.per_expert))
            ]
            rows = sum(s[0] for s in shapes)
            ok = all(tuple(s[1:]) == tuple(slot_shape[1:]) for s in shapes)
            got = f"parts {shapes}"
            ok = ok and rows == slot_shape[0]
        else:
            stored = self.keymap.stored(layer, ti)
            shape = self._memory_shape(stored)
            ok = tuple(shape[1:]) == tuple(slot_shape)
            got = f"{next(iter(stored.keys.values()))} {tuple(shape)}"
        if not ok:
            raise CheckpointError(
                f"layer {layer} {t.memory}: checkpoint holds {got}, the model expects one expert "
                f"as {tuple(slot_shape)}; the checkpoint does not match its config.json"
            )

    def pieces(
        self, layer: int, ti: int, experts: Sequence[int]
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        if not experts:
            return
        km, q = self.keymap, self.keymap.qconfig
        if km.layout == "per_expert":
            rows = self.part_rows(layer, ti)
            offsets = [sum(rows[:p]) for p in range(len(rows))]
            for e in experts:
                for p, off in enumerate(offsets):
                    yield e, off, read_stored(self.reader, km.stored(layer, ti, e, p), q)
            return
        stored = km.stored(layer, ti)
        rows_t = read_stored(self.reader, stored, q, rows=list(experts))  # [m, ...]
        if stored.format.quantized and self.arch.memory_transposed:
            rows_t = rows_t.transpose(-1, -2)  # [m, N, K] -> in-memory [m, K, N]
        for i, e in enumerate(experts):
            yield e, 0, rows_t[i]

    def read(
        self, layer: int, expert: int, like: Sequence[torch.Tensor], *, pin: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """One expert as host tensors shaped and typed like the slot tensors `like`."""
        out = []
        for ti, slot in enumerate(like):
            buf = torch.empty(slot.shape, dtype=slot.dtype, pin_memory=pin)
            for _, off, piece in self.pieces(layer, ti, [expert]):
                buf.narrow(0, off, piece.shape[0]).copy_(piece)
            out.append(buf)
        return tuple(out)


def read_plain(source: ModelSource, key: str) -> torch.Tensor:
    """A non-MoE checkpoint tensor as the model holds it (dequantized when it is the data key of
    a quantized linear; see `KeyMap.plain_target`)."""
    _, stored = source.keymap.plain_target(key)
    if stored is None:
        return source.reader.get(key)
    return read_stored(source.reader, stored, source.keymap.qconfig)


def notice_dequantized(source: ModelSource, device: torch.device, dtype: torch.dtype) -> None:
    """One notice when a quantized checkpoint's weights become dense in memory."""
    fmt = source.keymap.format
    if fmt.quantized:
        log.warning(
            "%s weights of %s are dequantized to %s at load (resident bytes are dense bytes; "
            "on %s experts cannot stay quantized yet)",
            fmt.name,
            source.path.name,
            str(dtype).removeprefix("torch."),
            device.type,
        )


# ---- the loader --------------------------------------------------------------------------------


@dataclass
class LoadInfo:
    """What `load_pruned` did."""

    keep: KeepSets
    plan: GroupPlan
    device: str
    dtype: str
    seconds: float
    bytes_read: int  # from the checkpoint
    param_bytes: int  # resident parameters (unique storage)
    expert_bytes: int  # of which routed experts
    buffer_bytes: int
    unexpected_keys: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "keep_count": self.keep.count,
            "group_plan": {
                "n_group": self.plan.n_group,
                "topk_group": self.plan.topk_group,
                "exact": self.plan.exact,
                "reason": self.plan.reason,
            },
            "device": self.device,
            "dtype": self.dtype,
            "seconds": self.seconds,
            "bytes_read": self.bytes_read,
            "param_bytes": self.param_bytes,
            "expert_bytes": self.expert_bytes,
            "buffer_bytes": self.buffer_bytes,
        }


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def load_pruned_with_info(
    model: str | Path | ModelSource,
    keep: KeepSets,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    top_k: int | None = None,
    progress: Progress | None = None,
    **from_config_kwargs: Any,
) -> tuple[Any, LoadInfo]:
    """`load_pruned`, also returning a `LoadInfo`."""
    src, owned = as_source(model)
    try:
        return _load(src, keep, device, dtype, top_k, progress, from_config_kwargs)
    finally:
        if owned:
            src.close()


def load_full(
    model: str | Path | ModelSource,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> Any:
    """The whole model (every expert kept), read like `load_pruned`: quantized checkpoints are
    dequantized by premoe, on any device, with no download."""
    src, owned = as_source(model)
    try:
        keep = KeepSets.uniform(src.moe_layers, range(src.num_experts))
        return load_pruned(src, keep, device=device, dtype=dtype)
    finally:
        if owned:
            src.close()


def load_pruned(
    model: str | Path | ModelSource,
    keep: KeepSets,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    top_k: int | None = None,
    progress: Progress | None = None,
    **from_config_kwargs: Any,
) -> Any:
    """An ordinary transformers model holding only `keep`'s experts, read from `model`'s
    original checkpoint (path, hub id or `ModelSource`).

    Equals `from_pretrained` of the checkpoint `premoe export` writes for the same keep sets;
    slot s of layer l is original expert `keep.layers[l][s]`. `dtype` None/"auto" follows the
    config as `from_pretrained(dtype="auto")` does; `top_k` lowers the routed count. Extra keyword
    arguments go to `from_config` (e.g. `experts_implementation="eager"`).
    """
    return load_pruned_with_info(
        model,
        keep,
        device=device,
        dtype=dtype,
        top_k=top_k,
        progress=progress,
        **from_config_kwargs,
    )[0]


def _load(
    src: ModelSource,
    keep: KeepSets,
    device_arg: str | torch.device,
    dtype_arg: str | torch.dtype | None,
    top_k: int | None,
    progress: Progress | None,
    kwargs: dict[str, Any],
) -> tuple[Any, LoadInfo]:
    t0 = time.perf_counter()
    arch, km, reader = src.arch, src.keymap, src.reader
    device = resolve_device(device_arg)
    dtype = resolve_dtype(dtype_arg, src)
    plan = keep.validate(arch, src.config, top_k=top_k)
    config = pruned_config(arch, src.config, keep, plan, top_k=top_k)
    read0 = reader.bytes_read

    notice_dequantized(src, device, dtype)
    model = build_skeleton(config, dtype, **kwargs)
    materialize(model, device, dtype)
    state = model.state_dict(keep_vars=True)  # name -> param / persistent buffer (aliases too)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    filled: set[int] = set()
    unexpected: list[str] = []

    # plan the reads: non-expert tensors by name, routers by kept rows, experts by slot
    plain: list[tuple[str, torch.Tensor]] = []
    routers: list[tuple[str, torch.Tensor, int, tuple[int, ...]]] = []
    for shard_keys in reader.keys_by_shard().values():
        for key in shard_keys:
            role = km.role(key)
            if isinstance(role, ExpertKey) or (role is not None and km.is_mtp(role.layer)):
                continue
            if isinstance(role, RouterKey):
                layer_mod = moe_layer(model, arch, role.layer)
                dst = tensor_of(layer_mod, role.tensor.memory)
                routers.append((key, dst, role.tensor.dim, keep.layers[role.layer]))
                continue
            name, _ = km.plain_target(key)
            if name is None:
                continue  # a quantization companion, read with its weight
            if name in tied and tied[name] in reader:
                continue  # a tied copy: the source tensor fills it
            if name not in state:
                unexpected.append(key)
                continue
            plain.append((key, state[name]))
    io = ExpertIO(src)
    experts: list[tuple[int, int, torch.Tensor]] = []  # layer, tensor index, param [E', ...]
    for layer in src.moe_layers:
        mod = moe_layer(model, arch, layer)
        for ti, t in enumerate(arch.experts):
            view = tensor_of(mod, t.memory)  # [E', ...]
            if view.shape[0] != len(keep.layers[layer]):
                raise CheckpointError(
                    f"layer {layer}: {t.memory} has {view.shape[0]} slots for "
                    f"{len(keep.layers[layer])} kept experts"
                )
            io.check_shape(layer, ti, view.shape[1:])
            experts.append((layer, ti, view))

    ebytes = sum(v.numel() * v.element_size() for _, _, v in experts)
    total = sum(t.numel() * t.element_size() for _, t in plain)
    total += sum(d.numel() * d.element_size() for _, d, _, _ in routers) + ebytes
    done = 0
    copier = Copier(device)

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    with torch.no_grad():
        for key, dst in plain:
            advance(copier.copy(dst, read_plain(src, key)))
            filled.add(id(dst))
        for key, dst, dim, kept in routers:
            advance(copier.copy(dst, reader.get_rows(key, list(kept), dim=dim)))
            filled.add(id(dst))
        for layer, ti, view in experts:
            kept = keep.layers[layer]
            slot_of = {e: s for s, e in enumerate(kept)}
            for e, off, piece in io.pieces(layer, ti, kept):
                dst = view[slot_of[e]].narrow(0, off, piece.shape[0])  # [rows, ...] of slot
                advance(copier.copy(dst, piece))
            filled.add(id(view))
        copier.finish()

    missing = [
        name
        for name, p in model.named_parameters()  # unique: tied aliases appear once
        if id(p) not in filled
    ]
    if missing:
        raise CheckpointError(
            f"checkpoint {src.path} has no tensor for {len(missing)} model parameter(s), e.g. "
            f"{missing[0]!r}; is it complete, and for this config.json?"
        )
    if unexpected:
        ignore = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
        surprising = [k for k in unexpected if not any(re.search(p, k) for p in ignore)]
        (log.warning if surprising else log.debug)(
            "%d checkpoint tensors are not used by the model (not read), e.g. %s",
            len(unexpected),
            unexpected[0],
        )
    _finish_model(model, src)
    pbytes = param_bytes(model)
    bbytes = sum(b.numel() * b.element_size() for b in model.buffers())
    info = LoadInfo(
        keep=keep,
        plan=plan,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        seconds=time.perf_counter() - t0,
        bytes_read=reader.bytes_read - read0,
        param_bytes=pbytes,
        expert_bytes=ebytes,
        buffer_bytes=bbytes,
        unexpected_keys=unexpected,
    )
    log.info(
        "loaded %s with %d experts per MoE layer on %s (%s): %.2f GB resident, %.2f GB read, "
        "%.1f s",
        src.path,
        keep.count,
        device,
        info.dtype,
        pbytes / 1e9,
        info.bytes_read / 1e9,
        info.seconds,
    )
    return model, info


def _finish_model(model: Any, src: ModelSource) -> None:
    """What `from_pretrained` does after the weights: eval mode, generation config, name."""
    model.eval()
    model.config._name_or_path = str(src.path)
    model.name_or_path = str(src.path)
    if (src.path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(src.path)
        except Exception as exc:  # a broken generation config should not block loading
            log.warning("ignoring %s: %s", src.path / "generation_config.json", exc)


def load_prefix(
    model: str | Path | ModelSource,
    *,
    layer: int | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> Any:
    """The model's prefix up to the router of MoE `layer` (default: the first MoE layer).

    The returned transformers model has the source's own (unpruned) config; only the input
    embeddings, every parameter of the decoder layers before `layer`, and the non-expert
    parameters of `layer` itself (attention, norms, shared experts, the full router) are read
    and placed on `device`. Experts, later layers and the output head stay on the meta device,
    so a forward pass must stop at that router, as `premoe.route.QueryKeyer` does: routing keys
    cost no expert. Raises `UsageError` when an earlier MoE layer exists (its experts would be
    needed).
    """
    src, owned = as_source(model)
    try:
        arch, km, reader = src.arch, src.keymap, src.reader
        moe = src.moe_layers
        layer = moe[0] if layer is None else int(layer)
        if layer not in moe:
            raise UsageError(f"layer {layer} is not an MoE layer of this model (MoE: {moe})")
        earlier = [n for n in moe if n < layer]
        if earlier:
            raise UsageError(
                f"a routing key at MoE layer {layer} needs the experts of the MoE layers "
                f"{earlier} before it; the expert-free prefix only reaches the first MoE layer "
                f"({moe[0]})"
            )
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, src)
        skel = build_skeleton(src.config, dt)
        state = skel.state_dict(keep_vars=True)
        head = skel.get_output_embeddings()
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        head_ids -= {id(p) for p in skel.get_input_embeddings().parameters()}  # tied: keep
        reads: list[tuple[str, str]] = []  # (checkpoint key, model name)
        for key in reader.keys():
            role = km.role(key)
            if isinstance(role, ExpertKey):
                continue
            if isinstance(role, RouterKey):
                if role.layer == layer:
                    reads.append((key, f"{arch.layers_prefix}.{layer}.{role.tensor.memory}"))
                continue
            name, _ = km.plain_target(key)
            index = layer_of(key, km.prefix)
            if name is None or (index is not None and index > layer) or name not in state:
                continue
            if index is None and id(state[name]) in head_ids:
                continue  # the output head is never reached
            reads.append((key, name))
        materialize(skel, dev, dt, only={id(state[name]) for _, name in reads})
        state = skel.state_dict(keep_vars=True)
        copier = Copier(dev)
        with torch.no_grad():
            for key, name in reads:
                copier.copy(state[name], read_plain(src, key))
            copier.finish()
        skel.eval()
        log.debug("prefix to MoE layer %d: %d tensors, %d bytes", layer, len(reads), copier.bytes)
        return skel
    finally:
        if owned:
            src.close()
