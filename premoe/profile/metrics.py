"""Expert-usage metrics and the model-faithful routing rule they are computed from.

A router's forward output is decoded into a `Routing` (logits, the routing weights the model
applies, the selected experts). Where a family's router does not return weights and indices
(Llama 4 returns `(scores, logits)`; Jamba's router in transformers 5.17 is a bare `nn.Linear`),
they are recomputed from the logits with the family's own rule (`RoutingRule`, built from the
`ArchSpec`). Per-token contributions of every metric are then summed into per-expert totals.

Metrics (DESIGN.md), all sums over the non-padding tokens t of a task, divided by the token count:

- ``tcess``: w[t, e] · 1[e ∈ TopK_t] · 1[p[t, e] ≥ r · max_j p[t, j]] (p: softmax probability
  or sigmoid score of the logits; w: the weight the model applies, scaling included).
- ``frequency``: share of routed selections (each selection counts 1/K, so a layer sums to 1).
- ``paper-logits``: the reference release's score: the raw logit of each token's top-1 expert
  (the selected expert with the largest weight), summed into that expert.
- ``reap``: routed weight × ‖expert output‖₂ (Cerebras' REAP). Its mean is taken over the tokens
  routed to each expert (REAP's definition), not over all tokens; see `PatternStore.scores`.

Shape legend: B batch, S sequence length, T = B·S tokens, H hidden size, E routed experts,
K experts per token, L MoE layers, R accumulated rows (metrics).
"""

from __future__ import annotations

from typing import Any

import torch

from premoe.arch.routing import (  # noqa: F401  (re-exported: profiling's routing rule)
    Routing,
    RoutingRule,
    decode_router_output,
    route_from_logits,
)
from premoe.errors import UsageError
from premoe.patterns.store import METRICS

DEFAULT_METRIC = "tcess"

# Rows of the per-layer accumulator. "counts" (routed selections per expert) is always kept: it
# gives `frequency` (counts / K) and REAP's per-expert denominator.
ROW_COUNTS = "counts"


def check_metrics(metrics: Any) -> list[str]:
    """Validate and de-duplicate metric names (order kept)."""
    if isinstance(metrics, str):
        metrics = [metrics]
    out: list[str] = []
    for m in metrics:
        if m not in METRICS:
            raise UsageError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
        if m not in out:
            out.append(m)
    if not out:
        raise UsageError(f"no metric given; choose from {', '.join(METRICS)}")
    return out


def check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 <= threshold < 1.0:
        raise UsageError(f"--threshold must be in [0, 1), got {threshold}")
    return threshold


def token_contributions(
    routing: Routing,
    mask: torch.Tensor,
    rule: RoutingRule,
    rows: tuple[str, ...],
    threshold: float,
) -> torch.Tensor:
    """Per-(token, choice) contributions [R, T, K] for `rows` (REAP excluded: see the hook).

    `mask` [T] is 1.0 for real tokens and 0.0 for padding.
    """
    w, idx, logits = routing.weights, routing.indices, routing.logits
    m = mask.to(w.dtype).unsqueeze(1).expand_as(w)  # [T, K]
    out: list[torch.Tensor] = []
    for row in rows:
        if row == ROW_COUNTS:
            out.append(m)
        elif row == "tcess":
            c = w * m
            if threshold > 0.0:
                p = rule.probs(logits)  # [T, E]
                keep = p.gather(1, idx) >= threshold * p.amax(-1, keepdim=True)  # [T, K]
                c = c * keep
            out.append(c)
        elif row == "paper-logits":
            slots = torch.arange(w.shape[-1], device=w.device)  # [K]
            top1 = (slots == w.argmax(-1, keepdim=True)).to(w.dtype)  # [T, K] one-hot
            out.append(logits.gather(1, idx) * top1 * m)
        else:
            raise ValueError(f"no per-token contribution for row {row!r}")
    return torch.stack(out)  # [R, T, K]


def scatter_rows(acc: torch.Tensor, contrib: torch.Tensor, indices: torch.Tensor) -> None:
    """acc[r, e] += Σ_{t,k: indices[t,k]=e} contrib[r, t, k]   (acc [R, E] float64, in place)."""
    r, e = acc.shape
    offs = torch.arange(r, device=indices.device).view(r, 1, 1) * e  # [R, 1, 1]
    flat = (indices.unsqueeze(0) + offs).reshape(-1)  # [R·T·K]
    acc.view(-1).index_add_(0, flat, contrib.reshape(-1).to(acc.dtype))
