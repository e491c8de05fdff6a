"""Layer-sequential router recalibration, for models too large to backpropagate through.

The end-to-end path (`premoe.calibrate.recalibrate`) needs the pruned model's full backward
pass. This path never does: it walks the decoder layers in order, GPTQ-style, and fits each MoE
layer's router locally:

1. the decoder layers' inputs are captured once (`premoe.profile.sequential.capture_batch`: the
   embeddings run, every layer is replaced by a catcher that records its arguments);
2. for each decoder layer in order, on the hidden states the *pruned, already recalibrated*
   lower layers produce: if it is an MoE layer, the block's input x and the full block's output
   y are taken (a hook while the full layer runs), the kept experts' outputs f [T, E', H] are
   computed once, and the kept router rows W [E', H] are trained with Adam so that the pruned
   block's output Σ_k w_k(x W^T) f_k matches y (relative squared error), with the family's
   routing rule on the E' kept experts; expert weights never change;
3. the layer then runs as the pruned, recalibrated layer (kept rows replaced by the trained ones,
   dropped experts masked: `premoe.prune.masked_routing`, exact by invariant 1) to produce the
   next layer's input.

Memory: one batch's activations per layer plus f (T x E' x H floats; `max_tokens` caps T).
`model` is either resident (a loaded model, run where it is) or streamed: a checkpoint (folder,
hub id, `ModelSource`) or a `LayerWeights`, whose model is a skeleton on the meta device filled
one decoder layer at a time from the checkpoint and emptied after that layer's fit and replay
(`premoe.profile.weights.CheckpointWeights`, the onloading of ``profile --sequential``; the
embeddings are on the device only while the layers' inputs are captured). Streamed, peak device
memory is about one decoder layer plus the activations; the routers equal the resident path's.

Shape legend: B batch, S sequence, T tokens, H hidden, E experts, E' kept, k routed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from premoe.arch.spec import ArchSpec
from premoe.calibrate.routers import CalibratedRouters, router_roles
from premoe.calibrate.select import block_output, expert_outputs
from premoe.errors import UsageError
from premoe.profile.hooks import correction_bias
from premoe.profile.metrics import RoutingRule
from premoe.profile.sequential import capture_batch, opened_weights
from premoe.profile.weights import LayerWeights, ModuleWeights
from premoe.prune.keepsets import KeepSets
from premoe.prune.mask import masked_routing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerwiseOptions:
    steps: int = 100  # Adam steps per MoE layer
    lr: float = 1e-2
    max_tokens: int = 8192  # tokens per layer the router is fitted on
    chunk_tokens: int = 2048  # tokens per step (a random chunk of the captured ones)
    seed: int = 0


def _tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    owner, attr = name.rsplit(".", 1)
    return getattr(module.get_submodule(owner), attr)


def _replay(layer: torch.nn.Module, hidden: torch.Tensor, rec: Any, i: int) -> torch.Tensor:
    slots, kw = rec.layer_args[i]
    args = [rec.values[s] for s in slots]
    kwargs = {k: rec.values[s] for k, s in kw.items()}
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def fit_router(
    x: torch.Tensor,
    y: torch.Tensor,
    f: torch.Tensor,
    weight: torch.Tensor,
    rule: Any,
    bias: torch.Tensor | None,
    options: LayerwiseOptions,
) -> tuple[torch.Tensor, float, float]:
    """Train router rows `weight` [E', H] so the pruned block output matches `y` [T, H] on `x`.

    `f` [T, E', H]: the kept experts' outputs. Returns (trained rows float32, relative error
    before, after), keeping the better of the start and the end.
    """
    w = weight.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=options.lr)
    g = torch.Generator().manual_seed(options.seed)
    xf = x.float()
    norm = (y**2).sum().clamp(min=1e-30)

    def rel(rows: torch.Tensor) -> float:
        with torch.no_grad():
            return float(((block_output(xf @ rows.T, f, rule, None, bias) - y) ** 2).sum() / norm)

    before = rel(w)
    t = x.shape[0]
    for _ in range(options.steps):
        idx = torch.randperm(t, generator=g)[: options.chunk_tokens].to(x.device)
        out = block_output(xf[idx] @ w.T, f[idx], rule, None, bias)  # [t, H]
        loss = ((out - y[idx]) ** 2).sum() / (y[idx] ** 2).sum().clamp(min=1e-30)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = rel(w)
    if after > before:
        return weight.detach().float().clone(), before, before
    return w.detach(), before, after


def recalibrate_layerwise(
    model: Any,
    arch: ArchSpec | None,
    keep: KeepSets,
    data: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    options: LayerwiseOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
) -> CalibratedRouters:
    """Layer-sequential router recalibration of the full `model` pruned to `keep` (module doc).

    `model`: a loaded transformers model (resident: run on the device it is on; `device` and
    `dtype` unused), or streamed from a checkpoint folder, hub id or `ModelSource` (one decoder
    layer at a time on `device`, in `dtype` as `from_pretrained` would use), or a `LayerWeights`
    (its device). `arch`: the family (None: the checkpoint's). `data`: right-padded (ids [B, S],
    mask [B, S]) batches of the task's corpus. The model is left unchanged. Returns calibrated
    routers (router weight rows trained; other router tensors as the source's kept rows).
    """

    opts = options or LayerwiseOptions()
    if opts.steps < 0 or opts.lr <= 0:
        raise UsageError("layerwise recalibration needs steps >= 0 and lr > 0")
    if not keep.layers:
        raise UsageError("layerwise recalibration needs keep sets for at least one MoE layer")
    if not data or not any(int(mask.sum()) for _, mask in data):
        raise UsageError("layerwise recalibration needs calibration data with at least one token")
    if isinstance(model, nn.Module):
        if arch is None:
            raise UsageError("layerwise recalibration of a loaded model needs its arch")
        here = ModuleWeights(model, next(model.parameters()).device)  # brings nothing
        return _run(here, arch, keep, data, opts, progress, streamed=False)
    with opened_weights(model, device, dtype) as weights:
        return _run(weights, arch or weights.arch, keep, data, opts, progress, streamed=True)


def _run(
    weights: LayerWeights,
    arch: ArchSpec,
    keep: KeepSets,
    data: Sequence[tuple[torch.Tensor, torch.Tensor]],
    opts: LayerwiseOptions,
    progress: Callable[[int, int], None] | None,
    *,
    streamed: bool,
) -> CalibratedRouters:
    model, dev = weights.model, weights.device
    rule = RoutingRule.from_arch(arch, model.config)
    moe = set(keep.layers)
    last = max(moe)
    t0 = time.perf_counter()
    layers_mod = model.get_submodule(arch.layers_prefix)
    tensors: dict[int, dict[str, torch.Tensor]] = {}
    info_layers: dict[str, Any] = {}
    prefix = weights.prefix_modules()
    weights.bring(prefix)
    weights.prefetch([layers_mod[0]])  # read while capturing
    with torch.no_grad():
        recs = [capture_batch(model, arch, ids.to(dev), mask.to(dev), last) for ids, mask in data]
    weights.release(prefix)
    hidden = [r.hidden for r in recs]
    masks = [mask.to(dev).reshape(-1).bool() for _, mask in data]
    for i in range(last + 1):
        layer = layers_mod[i]
        weights.bring([layer])
        if i < last:  # read the next layer while this one runs
            weights.prefetch([layers_mod[i + 1]])
        if i in moe:
            block = layer.get_submodule(arch.block)
            got: list[tuple[torch.Tensor, torch.Tensor]] = []

            def hook(_m: Any, args: Any, out: Any, got: list = got) -> None:
                x = args[0]
                y = out[0] if isinstance(out, tuple) else out
                got.append((x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])))

            h = block.register_forward_hook(hook)
            try:
                with torch.no_grad():
                    for b, rec in enumerate(recs):
                        _replay(layer, hidden[b], rec, i)
            finally:
                h.remove()
            x = torch.cat([g[0][m] for g, m in zip(got, masks, strict=True)])[: opts.max_tokens]
            y = torch.cat([g[1][m] for g, m in zip(got, masks, strict=True)])[: opts.max_tokens]
            del got
            kept = list(keep.layers[i])
            router_w = _tensor(layer, arch.router_weight.memory)  # [E, H]
            experts = layer.get_submodule(arch.experts[0].memory.rsplit(".", 1)[0])
            with torch.no_grad():
                f = expert_outputs(experts, x, kept)  # [T, E', H]
            bias = correction_bias(model, arch, i)
            bias_k = None if bias is None else bias.detach().float().reshape(-1)[kept]
            krule = replace(rule, num_experts=len(kept), n_group=1, topk_group=1)
            w_new, before, after = fit_router(x, y.float(), f, router_w[kept], krule, bias_k, opts)
            del f, x, y
            by_role = {}
            for spec in arch.router_tensors:
                full = _tensor(layer, spec.memory).detach().float()
                by_role[spec.role] = full.index_select(
                    spec.dim % full.dim(), torch.tensor(kept, device=full.device)
                ).cpu()
            by_role["weight"] = w_new.cpu()
            tensors[i] = by_role
            info_layers[str(i)] = {"relative_error_before": before, "relative_error_after": after}
            log.info("layer %d: relative block error %.4f -> %.4f", i, before, after)
            # run the layer as the pruned, recalibrated layer to feed the next one
            saved = router_w.detach().clone()
            with torch.no_grad():
                router_w[kept] = w_new.to(router_w.dtype).to(router_w.device)
                try:
                    with masked_routing(model, arch, KeepSets.from_mapping({i: kept})):
                        hidden = [_replay(layer, hidden[b], r, i) for b, r in enumerate(recs)]
                finally:
                    router_w.copy_(saved)
            weights.release([layer])
            if progress is not None:
                progress(len(tensors), len(moe))
        else:
            with torch.no_grad():
                hidden = [_replay(layer, hidden[b], r, i) for b, r in enumerate(recs)]
            weights.release([layer])
    assert set(tensors) == moe
    for by_role in tensors.values():
        assert set(by_role) == set(router_roles(arch))
    tokens = int(sum(int(m.sum()) for m in masks))
    return CalibratedRouters(
        keep,
        tensors,
        None,
        {
            "method": "layerwise",
            "options": asdict(opts),
            "tokens": tokens,
            "streamed": streamed,
            "seconds": time.perf_counter() - t0,
            "load_seconds": weights.load_seconds,
            "layers": info_layers,
        },
    )


__all__ = ["LayerwiseOptions", "fit_router", "recalibrate_layerwise"]
