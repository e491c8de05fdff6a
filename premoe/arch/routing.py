"""MoE token routing, model-faithful: how a family's router turns logits into the experts and
weights the model applies (DESIGN.md: routing, model-faithful), and how to read a router's
forward output whatever its family's convention.

Used by everything that looks at routing: profiling (metrics), TAER query keys, dropped-mass
measurement, recalibration and per-row masks in the server. Knowledge comes from the family's
`ArchSpec.router` (scoring, selection, renormalisation, groups, scaling).

Shape legend: T tokens, E routed experts, K experts per token, G routing groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from premoe.arch.spec import ArchSpec, config_value
from premoe.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class RoutingRule:
    """How a family turns router logits into (weights, experts); see `ArchSpec.router`."""

    scoring: str  # "softmax" | "sigmoid"
    selection: str  # "scores" | "logits_topk" | "sparsemixer"
    num_experts: int
    top_k: int
    renormalize: bool
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0
    jitter_eps: float = 0.0  # sparsemixer's threshold (PhiMoE router_jitter_noise)

    @classmethod
    def from_arch(cls, arch: ArchSpec, config: Any) -> RoutingRule:
        n_group, topk_group = arch.groups(config)
        return cls(
            scoring=arch.router.scoring,
            selection=arch.router.selection,
            num_experts=arch.num_experts(config),
            top_k=arch.top_k(config),
            renormalize=arch.renormalize(config),
            n_group=n_group,
            topk_group=topk_group,
            scaling=arch.scaling(config),
            jitter_eps=float(config_value(config, "router_jitter_noise", 0.0) or 0.0),
        )

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """p: per-expert scores [T, E] (softmax probabilities or sigmoid scores), float32."""
        logits = logits.float()
        return logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(-1)


@dataclass
class Routing:
    """One router call, decoded. Float tensors are float32."""

    logits: torch.Tensor  # [T, E]
    weights: torch.Tensor  # [T, K]
    indices: torch.Tensor  # [T, K] int64


def _sparsemixer(logits: torch.Tensor, eps: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer in eval mode (top-2 with a relative threshold mask)."""
    if k != 2:
        raise UnsupportedArchitectureError(f"sparsemixer routing is top-2 only, got top-{k}")
    scores = logits  # [T, E]
    top, first = scores.max(dim=-1, keepdim=True)  # [T, 1]
    factor = scores.abs().clamp(min=top)
    masked = scores.masked_fill((top - scores) / factor > 2 * eps, float("-inf"))
    w1 = masked.softmax(-1).gather(-1, first)  # [T, 1]
    rest = torch.scatter(scores, -1, first, float("-inf"))
    top2, second = rest.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=top2)
    masked2 = rest.masked_fill((top2 - scores) / factor > 2 * eps, float("-inf"))
    w2 = masked2.softmax(-1).gather(-1, second)
    return torch.cat((w1, w2), -1), torch.cat((first, second), -1)


def route_from_logits(
    logits: torch.Tensor, rule: RoutingRule, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's routing rule: logits [T, E] -> (weights [T, K] float32, indices [T, K])."""
    logits = logits.float()
    k = rule.top_k
    if rule.selection == "logits_topk":
        top, idx = torch.topk(logits, k, dim=-1)  # [T, K]
        w = top.sigmoid() if rule.scoring == "sigmoid" else top.softmax(-1)
        return w * rule.scaling, idx
    if rule.selection == "sparsemixer":
        w, idx = _sparsemixer(logits, rule.jitter_eps, k)
        return w * rule.scaling, idx
    p = rule.probs(logits)  # [T, E]
    choice = p if correction_bias is None else p + correction_bias.float().reshape(1, -1)
    if rule.n_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, rule.n_group, e // rule.n_group)
        group_scores = grouped.topk(min(2, e // rule.n_group), dim=-1)[0].sum(-1)  # [T, G]
        gidx = torch.topk(group_scores, rule.topk_group, dim=-1)[1]
        gmask = torch.zeros_like(group_scores).scatter_(1, gidx, 1.0).bool()  # [T, G]
        emask = gmask.unsqueeze(-1).expand_as(grouped).reshape(t, e)
        choice = choice.masked_fill(~emask, float("-inf"))
    idx = torch.topk(choice, k, dim=-1)[1]  # [T, K]
    w = p.gather(1, idx)
    if rule.renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * rule.scaling, idx


def decode_router_output(
    out: Any, rule: RoutingRule, correction_bias: torch.Tensor | None = None
) -> Routing:
    """Decode a router's forward output, whatever its family's convention.

    Recognised (by dtype and shape): ``(logits [T,E], weights [T,K], indices [T,K])`` (almost all
    families), ``(indices, weights, logits)`` (GraniteMoe in transformers 5.17),
    ``(scores [T,E], logits [T,E])`` (Llama 4) and a bare logits tensor (Jamba in 5.17, DBRX).
    Missing weights/indices are recomputed with `route_from_logits`.
    """
    e, k = rule.num_experts, rule.top_k
    if isinstance(out, torch.Tensor):
        parts: tuple[torch.Tensor, ...] = (out,)
    elif isinstance(out, (tuple, list)):
        parts = tuple(t for t in out if isinstance(t, torch.Tensor))
    else:
        parts = ()
    ints = [t for t in parts if not t.is_floating_point()]
    floats = [t for t in parts if t.is_floating_point()]
    if len(parts) == 3 and len(ints) == 1 and len(floats) == 2:
        indices = ints[0]
        # logits: the float tensor with E columns, weights: the one with K. When E == K the
        # tuple order decides: (logits, weights, indices) or (indices, weights, logits).
        if e != k:
            logits, weights = sorted(floats, key=lambda t: t.shape[-1] != e)
        elif parts[0] is indices:
            weights, logits = floats
        else:
            logits, weights = floats
        if logits.shape[-1] == e and weights.shape == indices.shape and indices.shape[-1] == k:
            return Routing(logits.float(), weights.float(), indices.long())
    if len(floats) >= 1 and not ints:
        # bare logits, or (scores, logits) where the logits come last (Llama 4)
        logits = floats[-1]
        if logits.shape[-1] == e:
            logits = logits.reshape(-1, e)
            weights, indices = route_from_logits(logits, rule, correction_bias)
            return Routing(logits.float(), weights, indices)
    shapes = [(tuple(t.shape), str(t.dtype)) for t in parts]
    raise UnsupportedArchitectureError(
        f"cannot decode the router output {shapes} (expected logits [T, {e}], weights and "
        f"indices [T, {k}]); this transformers version may route differently"
    )
