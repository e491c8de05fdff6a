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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from premoe.arch.keys import ExpertKey, RouterKey
from premoe.arch.model import layer_of, moe_layer, tensor_of  # noqa: F401  (re-exported)
from premoe.errors import CheckpointError, UsageError
from premoe.load.build import (  # noqa: F401  (re-exported)
    Copier,
    build_skeleton,
    materialize,
)
from premoe.load.experts import (  # noqa: F401  (re-exported)
    ExpertIO,
    notice_dequantized,
    read_plain,
)
from premoe.load.ragged import resize_blocks
from premoe.load.routers import RouterTensors, check_router_tensors, write_router_tensors
from premoe.prune.config import pruned_config
from premoe.prune.keepsets import GroupPlan, KeepSets
from premoe.quant.resident import quantize_resident
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


# ---- the loader --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertQuantization:
    """Keep the routed experts resident quantized (`premoe.quant.resident`): fp8 blocks or int4
    groups; on CUDA a Triton GEMV reads the quantized bytes, on the CPU they are dequantized per
    layer on the fly."""

    scheme: str  # "fp8" | "int4"
    block: tuple[int, int] = (128, 128)
    group_size: int = 128


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
    quantized: str | None = None  # resident expert precision when quantized ("fp8" / "int4")

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
            "quantized": self.quantized,
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
    quantize: ExpertQuantization | None = None,
    routers: RouterTensors | None = None,
    **from_config_kwargs: Any,
) -> tuple[Any, LoadInfo]:
    """`load_pruned`, also returning a `LoadInfo`."""
    src, owned = as_source(model)
    try:
        if routers is not None:  # before any weight is read
            check_router_tensors(src.arch, keep, routers)
        net, info = _load(src, keep, device, dtype, top_k, progress, from_config_kwargs)
        if routers is not None:
            write_router_tensors(net, src.arch, keep, routers)
        if quantize is not None:
            info = _quantize_experts(net, src, info, quantize)
        return net, info
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
    quantize: ExpertQuantization | None = None,
    routers: RouterTensors | None = None,
    **from_config_kwargs: Any,
) -> Any:
    """An ordinary transformers model holding only `keep`'s experts, read from `model`'s
    original checkpoint (path, hub id or `ModelSource`).

    `routers`: the pattern's own router tensors (`premoe.load.routers.RouterTensors`, e.g.
    `premoe.calibrate.CalibratedRouters.tensors`), written over the source's router rows.

    Equals `from_pretrained` of the checkpoint `premoe export` writes for the same keep sets;
    slot s of layer l is original expert `keep.layers[l][s]`. `dtype` None/"auto" follows the
    config as `from_pretrained(dtype="auto")` does; `top_k` lowers the routed count. Extra keyword
    arguments go to `from_config` (e.g. `experts_implementation="eager"`). Keep sets may differ
    in count between layers (non-uniform, `premoe.policy` allocation): each MoE layer then holds
    its own count (`premoe.load.ragged`); such a model has no uniform export.
    """
    return load_pruned_with_info(
        model,
        keep,
        device=device,
        dtype=dtype,
        top_k=top_k,
        progress=progress,
        quantize=quantize,
        routers=routers,
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
    plan = keep.validate(arch, src.config, top_k=top_k, allow_ragged=True)
    config = pruned_config(arch, src.config, keep, plan, top_k=top_k)
    read0 = reader.bytes_read

    notice_dequantized(src, device, dtype)
    model = build_skeleton(config, dtype, **kwargs)
    resize_blocks(model, arch, keep)  # non-uniform keep sets: each layer its own count
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


def _quantize_experts(
    model: Any, src: ModelSource, info: LoadInfo, q: ExpertQuantization
) -> LoadInfo:
    """Replace the loaded dense experts by quantized resident slots; the info's byte counts
    then describe what is resident (dense non-expert parameters + the quantized slots)."""
    owner = src.arch.experts[0].memory.rsplit(".", 1)[0]
    paths = [f"{src.arch.layers_prefix}.{layer}.{owner}" for layer in src.moe_layers]
    resident = quantize_resident(model, paths, q.scheme, block=q.block, group_size=q.group_size)
    dense = param_bytes(model)
    log.info(
        "experts resident in %s: %.2f GB (were %.2f GB dense)",
        q.scheme,
        resident.nbytes / 1e9,
        info.expert_bytes / 1e9,
    )
    return replace(
        info,
        param_bytes=dense + resident.nbytes,
        expert_bytes=resident.nbytes,
        quantized=q.scheme,
    )


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
