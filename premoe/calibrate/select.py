"""Output-aware, layer-sequential keep-set selection ("recon").

For every MoE layer l, in model order, on the task's corpus:

1. run the model with the layers below l already pruned to their chosen sets (masked routing,
   `premoe.prune.masked_routing`, exact by invariant 1), and capture the MoE block's input x [T, H]
   at layer l: the activations the pruned model will really feed this layer;
2. compute every expert's output f_e(x) on those tokens (one call of the family's experts module
   with forced routing, as the REAP metric does) and the router's logits z = router(x);
3. the target is the full block's output y = Σ_{e ∈ TopK(z)} w_e f_e(x); for a candidate keep
   set S the pruned block outputs y_S (the family's routing rule on z with dropped experts at -inf:
   exactly what the pruned model computes), and the error is Σ_t ‖y_S − y‖²;
4. choose S: from two starts (greedy additions of the expert that lowers the error most; the K
   experts with the most routed weight), both holding the "super experts" (below), improve by
   swaps (drop one, add one) while the error falls, and keep the better.

**Super experts** (arXiv 2507.23279): experts that are rarely routed but produce outputs far
larger than the others (massive activations). A token-averaged score such as TCESS ranks them
low, and dropping them can break the model. Here an expert whose largest output norm on the
task's tokens (max_t ‖f_e(x_t)‖) exceeds `super_factor` times the median of the layer's maxima
is always kept.

The result is a `Selection` whose ranking is the greedy order, so exports and plans treat it like
any policy's. Cost: one forward of the model per MoE layer over `max_tokens` tokens, plus
E forced expert calls per layer; the greedy search works on [T, E] routing logits and [T, E, H]
expert outputs (kept on the model's device; lower `max_tokens` for large H·E).

Shape legend: T calibration tokens, H hidden, E experts, K kept, k routed per token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from premoe.errors import UnsupportedArchitectureError, UsageError
from premoe.policy import Selection, take
from premoe.profile.hooks import correction_bias
from premoe.profile.metrics import RoutingRule, route_from_logits
from premoe.prune.keepsets import KeepSets
from premoe.prune.mask import masked_routing

log = logging.getLogger(__name__)

DEFAULT_SUPER_FACTOR = 10.0


@dataclass(frozen=True)
class ReconOptions:
    max_tokens: int = 4096  # calibration tokens the search uses per layer
    batch_size: int = 64
    swap_passes: int = 4  # rounds of swap refinement of each start
    super_factor: float | None = DEFAULT_SUPER_FACTOR  # None: no super-expert protection


def _block(model: Any, arch: Any, layer: int) -> torch.nn.Module:
    return model.get_submodule(f"{arch.layers_prefix}.{layer}.{arch.block}")


def _sub(model: Any, arch: Any, layer: int, rel: str) -> torch.nn.Module:
    return model.get_submodule(f"{arch.layers_prefix}.{layer}.{rel}")


@torch.no_grad()
def capture_block_inputs(
    model: Any,
    arch: Any,
    layer: int,
    data: Sequence[tuple[torch.Tensor, torch.Tensor]],
    keep_below: KeepSets | None,
    max_tokens: int,
) -> torch.Tensor:
    """The real-token inputs [T, H] of `layer`'s MoE block, lower layers pruned to
    `keep_below` (masked routing). Stops the forward at the block (no work above it)."""
    block = _block(model, arch, layer)
    got: list[torch.Tensor] = []
    mask_now: list[torch.Tensor] = []

    class _Stop(Exception):
        pass

    def pre(_m: Any, args: Any, kwargs: Any) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        flat = x.reshape(-1, x.shape[-1])
        got.append(flat[mask_now[0].reshape(-1).to(flat.device).bool()].float())
        raise _Stop

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    dev = next(model.parameters()).device
    total = 0
    try:
        for ids, mask in data:
            mask_now[:] = [mask]
            try:
                if keep_below is not None and keep_below.layers:
                    with masked_routing(model, arch, keep_below):
                        model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
                else:
                    model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
            except _Stop:
                pass
            total += int(mask.sum())
            if total >= max_tokens:
                break
    finally:
        handle.remove()
    return torch.cat(got)[:max_tokens]  # [T, H]


@torch.no_grad()
def expert_outputs(
    experts: torch.nn.Module, x: torch.Tensor, num_experts: int | Sequence[int]
) -> torch.Tensor:
    """f_e(x) for every expert e (or the listed ones) and token: [T, E, H] float32 (forced
    routing, weight 1)."""
    t = x.shape[0]
    ids = range(num_experts) if isinstance(num_experts, int) else list(num_experts)
    dtype = next(experts.parameters()).dtype
    xin = x.to(dtype)
    out = []
    for e in ids:
        idx = torch.full((t, 1), e, dtype=torch.long, device=x.device)
        ones = torch.ones((t, 1), dtype=dtype, device=x.device)
        try:
            f = experts(xin, idx, ones)
        except TypeError as exc:
            raise UnsupportedArchitectureError(
                "recon selection needs an experts module called with (hidden, indices, "
                f"weights); this family's is not ({exc})"
            ) from None
        out.append(f.float().reshape(t, -1))
    return torch.stack(out, 1)  # [T, E, H]


@torch.no_grad()
def router_logits(router: torch.nn.Module, x: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The router's logits [T, E] on x (decoded from any family's router output)."""
    dtype = next(router.parameters()).dtype
    out = router(x.to(dtype))
    parts = out if isinstance(out, tuple | list) else (out,)
    # the float tensor with E columns; Llama 4 returns (scores, logits): take the last
    cands = [
        p
        for p in parts
        if isinstance(p, torch.Tensor) and p.is_floating_point() and p.shape[-1] == num_experts
    ]
    if not cands:
        raise UnsupportedArchitectureError("cannot find the router logits in its output")
    logits = cands[-1] if len(parts) == 2 else cands[0]
    return logits.float().reshape(-1, num_experts)


def block_output(
    logits: torch.Tensor,
    f: torch.Tensor,
    rule: Any,
    allowed: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [T, H] of the block restricted to `allowed` [E] bool (None: every expert)."""

    z = logits
    b = bias
    k = rule.top_k
    if allowed is not None:
        n = int(allowed.sum())
        k = min(k, n)
        z = logits.masked_fill(~allowed, float("-inf"))
        if b is not None:
            b = b.float().reshape(-1).masked_fill(~allowed, float("-inf"))
    r = replace(rule, top_k=k, n_group=1, topk_group=1) if allowed is not None else rule
    w, idx = route_from_logits(z, r, b)  # [T, k]
    chosen = f.gather(1, idx.unsqueeze(-1).expand(-1, -1, f.shape[-1]))  # [T, k, H]
    return (w.unsqueeze(-1) * chosen).sum(1)


def _error(y: torch.Tensor, target: torch.Tensor) -> float:
    return float(((y - target) ** 2).sum())


def super_experts(f: torch.Tensor, factor: float | None) -> list[int]:
    """Experts whose largest output norm on the task's tokens, max_t ‖f_e(x_t)‖, exceeds
    `factor` × the median of the layer's maxima (massive-activation experts), largest first."""
    if factor is None:
        return []
    peak = f.norm(dim=-1).amax(0)  # [E]
    med = peak.median()
    if float(med) <= 0:
        return []
    hits = torch.nonzero(peak > factor * med).flatten()
    return [int(e) for e in hits[torch.argsort(peak[hits], descending=True)].tolist()]


def _errors(
    logits: torch.Tensor,
    f: torch.Tensor,
    rule: Any,
    target: torch.Tensor,
    sets: Sequence[Sequence[int]],
    bias: torch.Tensor | None,
    chunk: int = 16,
) -> list[float]:
    """Σ_t ‖y_S − y‖² for many candidate sets S of the same size, `chunk` at a time."""

    t, n_exp, _ = f.shape
    k = min(rule.top_k, len(sets[0]))
    r = replace(rule, top_k=k, n_group=1, topk_group=1)
    rows = torch.arange(t, device=f.device)
    out: list[float] = []
    for start in range(0, len(sets), chunk):
        part = sets[start : start + chunk]
        c = len(part)
        allowed = torch.zeros((c, n_exp), dtype=torch.bool, device=f.device)
        for i, ids in enumerate(part):
            allowed[i, list(ids)] = True
        z = logits.unsqueeze(0).masked_fill(~allowed.unsqueeze(1), float("-inf"))  # [C, T, E]
        if bias is None:
            w, idx = route_from_logits(z.reshape(c * t, n_exp), r, None)  # [C·T, k]
        else:  # correction bias (selection only): dropped experts must not be chosen through it
            p = r.probs(z.reshape(c * t, n_exp))  # [C·T, E]
            bb = bias.float().reshape(1, 1, -1).masked_fill(~allowed.unsqueeze(1), float("-inf"))
            idx = torch.topk(p + bb.expand(c, t, -1).reshape(c * t, n_exp), k, dim=-1)[1]
            w = p.gather(1, idx)
            if r.renormalize:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
            w = w * r.scaling
        tt = rows.repeat(c)  # [C·T]
        chosen = f[tt.unsqueeze(1), idx]  # [C·T, k, H]
        y = (w.unsqueeze(-1) * chosen).sum(1).view(c, t, -1)  # [C, T, H]
        out += ((y - target.unsqueeze(0)) ** 2).sum(dim=(1, 2)).tolist()
    return out


def greedy_keep(
    logits: torch.Tensor,
    f: torch.Tensor,
    rule: Any,
    k_kept: int,
    *,
    forced: Sequence[int] = (),
    swap_passes: int = 4,
    bias: torch.Tensor | None = None,
) -> tuple[list[int], float, float]:
    """The K experts whose restricted block output is closest to the full one. Two starts (greedy
    additions; the K experts with the most routed weight), each improved by swaps (drop one, add
    one; the best swap of each slot) while the error falls; the better one wins. `forced`
    experts are always kept. Returns (experts, relative error, relative error of the
    top-routed-weight set)."""

    n_exp = f.shape[1]
    target = block_output(logits, f, rule, None, bias)
    norm = max(float((target**2).sum()), 1e-30)
    fixed = list(dict.fromkeys(int(e) for e in forced))[:k_kept]

    def errs(sets: Sequence[Sequence[int]]) -> list[float]:
        return _errors(logits, f, rule, target, sets, bias)

    greedy = list(fixed)
    while len(greedy) < k_kept:
        cands = [e for e in range(n_exp) if e not in greedy]
        v = errs([[*greedy, e] for e in cands])
        greedy.append(cands[min(range(len(v)), key=v.__getitem__)])
    w, idx = route_from_logits(logits, rule, bias)
    mass = torch.zeros(n_exp, device=f.device).index_add_(0, idx.reshape(-1), w.reshape(-1))
    by_mass = [int(e) for e in torch.argsort(mass, descending=True).tolist()]
    top = [*fixed, *[e for e in by_mass if e not in fixed]][:k_kept]
    base = errs([by_mass[:k_kept]])[0]

    def refine(chosen: list[int]) -> tuple[list[int], float]:
        current = errs([chosen])[0]
        for _ in range(swap_passes):
            improved = False
            for i in range(len(chosen)):
                if chosen[i] in fixed:
                    continue
                cands = [e for e in range(n_exp) if e not in chosen]
                trials = [[*chosen[:i], e, *chosen[i + 1 :]] for e in cands]
                v = errs(trials)
                j = min(range(len(v)), key=v.__getitem__)
                if v[j] < current - 1e-9 * norm:
                    chosen, current, improved = trials[j], v[j], True
            if not improved:
                break
        return chosen, current

    results = [refine(greedy), refine(top)]
    chosen, current = min(results, key=lambda r: r[1])
    return chosen, current / norm, base / norm


def recon_select(
    model: Any,
    arch: Any,
    layers: Sequence[int],
    data: Sequence[tuple[torch.Tensor, torch.Tensor]],
    k_kept: int,
    *,
    options: ReconOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Selection:
    """Layer-sequential output-aware selection of K experts per MoE layer (module doc).

    `model`: the full model (any device), `data`: right-padded (ids, mask) batches of the task's
    corpus. Returns a `Selection` (uniform K; `order` holds the chosen experts first, in the
    order chosen, then the rest by routed weight).
    """

    opts = options or ReconOptions()
    config = model.config
    rule = RoutingRule.from_arch(arch, config)
    n_exp = rule.num_experts
    if not rule.top_k <= k_kept <= n_exp:
        raise UsageError(f"keep must be between {rule.top_k} and {n_exp}, got {k_kept}")
    if rule.selection == "sparsemixer":
        raise UnsupportedArchitectureError("recon selection does not support sparsemixer routers")
    layers = [int(x) for x in layers]
    chosen: dict[int, list[int]] = {}
    prov_layers: dict[str, Any] = {}
    orders = []
    for i, layer in enumerate(layers):
        below = KeepSets.from_mapping(chosen) if chosen else None
        x = capture_block_inputs(model, arch, layer, data, below, opts.max_tokens)  # [T, H]
        router = _sub(model, arch, layer, arch.router.module)
        experts = _sub(model, arch, layer, arch.experts[0].memory.rsplit(".", 1)[0])
        logits = router_logits(router, x, n_exp)  # [T, E]
        f = expert_outputs(experts, x, n_exp)  # [T, E, H]
        bias = correction_bias(model, arch, layer)
        bias = None if bias is None else bias.detach().float().reshape(-1)
        forced = super_experts(f, opts.super_factor)
        if len(forced) > k_kept:
            forced = forced[:k_kept]
        ids, rel, base = greedy_keep(
            logits, f, rule, k_kept, forced=forced, swap_passes=opts.swap_passes, bias=bias
        )
        chosen[layer] = ids
        prov_layers[str(layer)] = {
            "relative_error": rel,
            "relative_error_top_weight": base,
            "super_experts": forced,
            "tokens": int(x.shape[0]),
        }
        rest = [e for e in range(n_exp) if e not in ids]
        orders.append(torch.tensor([*ids, *rest], dtype=torch.long))
        log.info(
            "layer %d: %d experts, relative output error %.4f (top routed weight: %.4f)%s",
            layer,
            k_kept,
            rel,
            base,
            f", super experts {forced}" if forced else "",
        )
        del f, x, logits
        if progress is not None:
            progress(i + 1, len(layers))
    order = torch.stack(orders)  # [L, E]
    kept = take(order, k_kept)
    keep = KeepSets.from_mapping(dict(zip(layers, kept, strict=True)))
    return Selection(
        keep=keep,
        layers=tuple(layers),
        order=order,
        ranked=dict(zip(layers, kept, strict=True)),
        scores=None,
        coverage=None,
        top_k=None,
        provenance={
            "name": "recon",
            "count": k_kept,
            "count_from": "given",
            "keep": k_kept,
            "rule": "layer-sequential greedy reconstruction of each MoE block's output on the "
            "pruned lower layers' activations",
            "options": {
                "max_tokens": opts.max_tokens,
                "swap_passes": opts.swap_passes,
                "super_factor": opts.super_factor,
            },
            "layers": prov_layers,
        },
    )


__all__ = [
    "ReconOptions",
    "block_output",
    "capture_block_inputs",
    "expert_outputs",
    "greedy_keep",
    "recon_select",
    "router_logits",
    "super_experts",
]
