"""PEP keep-set policies: from per-layer expert scores to the experts each MoE layer keeps.

Shape legend: L MoE layers (rows, in the order of the `layers` argument), E routed experts per
layer, K experts kept per layer, k experts routed per token.

Every policy reduces to two choices:

1. **An order** per layer: the experts ranked best first (`[L, E]` expert ids). The `task` policy
   ranks by the task's scores (several tasks: by the sum of per-layer-normalised scores, or by a
   round-robin "union" of the tasks' own rankings); `global` ranks by the scores of all tasks
   pooled; `random` is a seeded random permutation. Ties are broken by the lower expert id.
2. **A count K**, uniform over layers (standard model code needs that): given (`keep=K`), the
   smallest K whose kept scores cover a fraction C of every layer's total (`coverage=C`), or the
   largest K whose resident size fits a byte budget (`budget=B`). The count never goes below the
   routed count k. For the `random` and `global` baselines the count is computed from the task
   scores when there are any, so a baseline is compared at the same K as the task policy.

The kept experts of a layer are the first K of its order, except for group-limited routers
(`n_group > 1`, DeepSeek-V3 style): when K is a multiple of `n_group` (and the pruned groups can
still route, see `group_exact_possible`), every group keeps its own best K / n_group experts, so
group routing stays exact. Otherwise the first K are kept and the pruned model falls back to one
group (`KeepSets.validate` reports it in the `GroupPlan`). `coverage` and `budget` prefer counts
that keep groups exact.

One module because every policy (count, coverage, budget, global, random, non-uniform) ranks
experts and respects routing groups through the same helpers (`take`, `budget_count`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from premoe.errors import UsageError
from premoe.prune import KeepSets

log = logging.getLogger(__name__)

POLICIES: tuple[str, ...] = ("task", "random", "global")
MERGES: tuple[str, ...] = ("sum", "union")

MERGE_DESCRIPTIONS = {
    "sum": "sum of per-layer-normalised task scores; the top experts of the sum are kept",
    "union": "union of the tasks' own rankings, taken round-robin (each task adds its next best "
    "expert in turn) until K experts per layer",
}

# ---- byte sizes ----------------------------------------------------------------------------------

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: str | int | float) -> int:
    """A byte count from `24GiB`, `500MB`, `1.5e9`, `24G` (single letters are binary: GiB)."""
    if isinstance(value, bool):
        raise UsageError(f"expected a size in bytes, got {value!r}")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    else:
        m = _SIZE.match(value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise UsageError(
                f"cannot read size {value!r}; write it like 24GiB, 500MB, 1.5e9 "
                "(units B, KB/MB/GB/TB = powers of 10, KiB/MiB/GiB/TiB or K/M/G/T = powers of 2)"
            )
        number, unit = float(m.group(1)), m.group(2).lower()
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size <= 0:
        raise UsageError(f"size {value!r} must be a positive number of bytes")
    return int(size)


def human_bytes(n: float) -> str:
    """`24.0 GiB`-style size for messages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ---- orders --------------------------------------------------------------------------------------


def _check_scores(scores: torch.Tensor, what: str = "scores") -> torch.Tensor:
    if scores.dim() != 2:
        raise UsageError(f"{what} must be [layers, experts], got shape {tuple(scores.shape)}")
    s = scores.detach().to("cpu", torch.float64)
    if not torch.isfinite(s).all():
        raise UsageError(f"{what} contain NaN or infinite values; the pattern store is corrupt")
    return s  # [L, E]


def expert_order(scores: torch.Tensor) -> torch.Tensor:
    """Experts of every layer ranked by score, best first; ties by the lower id. [L, E] long."""
    s = _check_scores(scores)  # [L, E]
    return torch.sort(s, dim=1, descending=True, stable=True).indices  # [L, E]


def normalize_rows(scores: torch.Tensor) -> torch.Tensor:
    """Each layer's scores divided by the layer's total (rows with negatives shifted to min 0).

    A layer whose scores are all equal to zero stays zero. [L, E] float64.
    """
    s = _check_scores(scores)  # [L, E]
    low = s.min(dim=1, keepdim=True).values.clamp(max=0.0)  # [L, 1]
    s = s - low
    total = s.sum(dim=1, keepdim=True)  # [L, 1]
    return torch.where(total > 0, s / total.clamp(min=1e-300), torch.zeros_like(s))


def merge_sum(task_scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of per-layer-normalised scores of several tasks. [L, E] float64."""
    if not task_scores:
        raise UsageError("no task scores to merge")
    shapes = {tuple(t.shape) for t in task_scores}
    if len(shapes) != 1:
        raise UsageError(f"task scores have different shapes {sorted(shapes)}")
    return torch.stack([normalize_rows(t) for t in task_scores]).sum(dim=0)


def union_order(orders: Sequence[torch.Tensor]) -> torch.Tensor:
    """Round-robin union of several rankings: task 1's best, task 2's best, task 1's second...

    Experts already taken are skipped, so the first K of the result are the union of every
    task's top ~K/T experts. [L, E] long.
    """
    if len(orders) == 1:
        return orders[0].clone()
    n_layers, n_experts = orders[0].shape
    out = torch.empty((n_layers, n_experts), dtype=torch.long)
    for row in range(n_layers):
        seen: set[int] = set()
        merged: list[int] = []
        for rank in range(n_experts):
            for order in orders:
                e = int(order[row, rank])
                if e not in seen:
                    seen.add(e)
                    merged.append(e)
        out[row] = torch.tensor(merged, dtype=torch.long)
    return out  # [L, E]


def random_order(n_layers: int, n_experts: int, seed: int = 0) -> torch.Tensor:
    """A seeded random permutation of the experts per layer. [L, E] long."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(n_experts, generator=g) for _ in range(n_layers)])


# ---- groups --------------------------------------------------------------------------------------


def group_exact_possible(
    k_kept: int, num_experts: int, groups: tuple[int, int], routed: int
) -> bool:
    """Whether keeping `k_kept` experts per layer, K / n_group per group, keeps group routing
    exact: K divisible by n_group, at least 2 per group (the group score sums a group's top-2),
    and the `topk_group` chosen groups still offer `routed` experts."""
    n_group, topk_group = groups
    if n_group <= 1:
        return True
    if num_experts % n_group or k_kept % n_group:
        return False
    c = k_kept // n_group
    return c >= 2 and topk_group * c >= routed


def take(
    order: torch.Tensor,
    k_kept: int,
    *,
    num_experts: int | None = None,
    groups: tuple[int, int] = (1, 1),
    routed: int = 1,
) -> list[list[int]]:
    """The kept experts of every layer: the first `k_kept` of its order, or per group when the
    group structure can be kept (see `group_exact_possible`). Returns per-layer lists in order
    of preference (best first)."""
    n_layers, n_experts = order.shape
    num_experts = n_experts if num_experts is None else num_experts
    if not 1 <= k_kept <= n_experts:
        raise UsageError(f"keep must be between 1 and {n_experts} experts, got {k_kept}")
    rows = order.tolist()
    if groups[0] > 1 and group_exact_possible(k_kept, num_experts, groups, routed):
        size = num_experts // groups[0]
        c = k_kept // groups[0]
        out = []
        for row in rows:
            count = [0] * groups[0]
            kept = []
            for e in row:
                g = e // size
                if count[g] < c:
                    count[g] += 1
                    kept.append(e)
            out.append(kept)
        return out
    return [row[:k_kept] for row in rows]


def kept_share(scores: torch.Tensor, kept: Sequence[Sequence[int]]) -> torch.Tensor:
    """Fraction of every layer's total score that the kept experts hold. [L] float64.

    A layer whose total is zero counts as fully covered.
    """
    s = normalize_rows(scores)  # [L, E]
    share = torch.empty(s.shape[0], dtype=torch.float64)
    for row, ids in enumerate(kept):
        total = float(s[row].sum())
        share[row] = float(s[row, list(ids)].sum()) if total > 0 else 1.0
    return share  # [L]


# ---- counts --------------------------------------------------------------------------------------


def coverage_count(
    coverage: float,
    order: torch.Tensor,
    coverage_scores: Sequence[torch.Tensor],
    *,
    routed: int,
    groups: tuple[int, int] = (1, 1),
    prefer_exact_groups: bool = True,
) -> int:
    """The smallest uniform K (>= routed) whose kept experts cover `coverage` of every layer's
    total, for every score tensor in `coverage_scores` (one per task for a union merge).

    For group-limited routers, the smallest K that keeps groups exact is preferred when one
    reaches the coverage.
    """
    if not 0.0 < coverage <= 1.0:
        raise UsageError(f"coverage must be in (0, 1], got {coverage}")
    for s in coverage_scores:
        if bool((_check_scores(s) < 0).any()):
            raise UsageError(
                "coverage needs non-negative scores, but this metric has negative values; "
                "use --keep or --budget, or a non-negative metric such as tcess"
            )
    n_experts = order.shape[1]
    found: int | None = None
    found_exact: int | None = None
    for k in range(max(1, routed), n_experts + 1):
        kept = take(order, k, groups=groups, routed=routed)
        low = min(float(kept_share(s, kept).min()) for s in coverage_scores)
        if low + 1e-12 >= coverage:
            exact = group_exact_possible(k, n_experts, groups, routed)
            if found is None:
                found = k
            if exact:
                found_exact = k
                break
            if not prefer_exact_groups or groups[0] <= 1:
                break
    assert found is not None  # k = E covers everything
    if found_exact is not None and found_exact != found:
        log.info(
            "coverage %.3g: %d experts reach it, %d keep the %d routing groups exact; using %d",
            coverage,
            found,
            found_exact,
            groups[0],
            found_exact,
        )
        return found_exact
    return found


def budget_count(
    budget: int,
    bytes_for: Callable[[int], int],
    n_experts: int,
    *,
    routed: int,
    groups: tuple[int, int] = (1, 1),
    prefer_exact_groups: bool = True,
) -> int:
    """The largest uniform K (>= routed) whose resident size `bytes_for(K)` fits `budget`.

    For group-limited routers the largest K that keeps groups exact is preferred when one fits.
    """
    base = bytes_for(0)
    if base > budget:
        raise UsageError(
            f"budget {human_bytes(budget)} is smaller than the model without any routed expert "
            f"({human_bytes(base)}: attention, embeddings, dense and shared layers); "
            "raise the budget"
        )
    fits = [k for k in range(max(1, routed), n_experts + 1) if bytes_for(k) <= budget]
    if not fits:
        raise UsageError(
            f"budget {human_bytes(budget)} fits fewer than the {routed} experts routed per token "
            f"(keeping {routed} needs {human_bytes(bytes_for(routed))}); raise the budget or "
            "lower the routed count with --top-k"
        )
    best = fits[-1]
    if prefer_exact_groups and groups[0] > 1:
        exact = [k for k in fits if group_exact_possible(k, n_experts, groups, routed)]
        if exact and exact[-1] != best:
            log.info(
                "budget fits %d experts; using %d, which keeps the %d routing groups exact",
                best,
                exact[-1],
                groups[0],
            )
            return exact[-1]
    return best


# ---- the whole policy ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The experts a policy keeps, with what it was computed from."""

    keep: KeepSets  # original ids per MoE layer (sorted)
    layers: tuple[int, ...]  # MoE layer ids, the rows of `order` and `scores`
    order: torch.Tensor  # [L, E] the policy's preference order, best first
    ranked: dict[int, list[int]]  # kept experts per layer, best first
    scores: torch.Tensor | None  # [L, E] the scores behind the order (None: random)
    coverage: torch.Tensor | None  # [L] kept share of the task scores (min over tasks)
    top_k: int | None  # routed count of the pruned model (None: the model's own)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return self.keep.count


def _as_task_scores(
    scores: torch.Tensor | Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    if scores is None:
        return {}
    if isinstance(scores, torch.Tensor):
        return {"scores": scores}
    return dict(scores)


def select_experts(
    scores: torch.Tensor | Mapping[str, torch.Tensor] | None,
    layers: Sequence[int],
    *,
    num_experts: int,
    routed: int,
    keep: int | None = None,
    coverage: float | None = None,
    budget: int | str | None = None,
    bytes_for: Callable[[int], int] | None = None,
    top_k: int | None = None,
    policy: str = "task",
    pooled: torch.Tensor | None = None,
    merge: str = "sum",
    groups: tuple[int, int] = (1, 1),
    seed: int = 0,
    prefer_exact_groups: bool = True,
) -> Selection:
    """Choose the kept experts of every MoE layer.

    `scores`: one `[L, E]` tensor, or `{task: [L, E]}` for several tasks (merged by `merge`).
    Exactly one of `keep`, `coverage`, `budget` sets the count; `budget` needs `bytes_for(K)`,
    the resident bytes with K experts per layer (`premoe.plan.SizeModel.resident`). `top_k`
    lowers the routed count of the pruned model (the "4/64" configurations); the count never
    goes below it (or below the model's `routed` count when `top_k` is None). `policy`:
    `task` (rank by the task scores), `global` (rank by `pooled`, all tasks together),
    `random` (seeded). `groups`: `arch.groups(config)`.
    """
    layers = tuple(int(x) for x in layers)
    n_layers = len(layers)
    if policy not in POLICIES:
        raise UsageError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if merge not in MERGES:
        raise UsageError(f"unknown merge {merge!r}; choose one of {', '.join(MERGES)}")
    counts = {"keep": keep, "coverage": coverage, "budget": budget}
    given = [name for name, value in counts.items() if value is not None]
    if len(given) != 1:
        raise UsageError(
            "give exactly one of --keep K, --coverage C or --budget BYTES "
            f"(got {', '.join(given) or 'none'})"
        )
    if top_k is not None and not 1 <= top_k <= routed:
        raise UsageError(f"--top-k must be between 1 and the model's {routed}, got {top_k}")
    k_routed = routed if top_k is None else top_k

    tasks = _as_task_scores(scores)
    for name, s in tasks.items():
        if tuple(s.shape) != (n_layers, num_experts):
            raise UsageError(
                f"scores of {name!r} have shape {tuple(s.shape)}, expected "
                f"[{n_layers} MoE layers, {num_experts} experts]"
            )
    if pooled is not None and tuple(pooled.shape) != (n_layers, num_experts):
        raise UsageError(
            f"pooled scores have shape {tuple(pooled.shape)}, expected [{n_layers}, {num_experts}]"
        )

    # the task order and the scores that coverage is measured on
    task_order: torch.Tensor | None = None
    task_scores: torch.Tensor | None = None
    coverage_scores: list[torch.Tensor] = []
    if tasks:
        if merge == "union" and len(tasks) > 1:
            task_order = union_order([expert_order(s) for s in tasks.values()])
            task_scores = merge_sum(list(tasks.values()))
            coverage_scores = list(tasks.values())
        else:
            task_scores = (
                merge_sum(list(tasks.values()))
                if len(tasks) > 1
                else tasks[next(iter(tasks))].to(torch.float64)
            )
            task_order = expert_order(task_scores)
            coverage_scores = [task_scores]

    if policy == "task":
        if task_order is None:
            raise UsageError("the task policy needs task scores (give --store and --task)")
        order, order_scores = task_order, task_scores
    elif policy == "global":
        if pooled is None:
            raise UsageError("the global policy needs the pooled scores of the store")
        order_scores = pooled.to(torch.float64)
        order = expert_order(order_scores)
        if not coverage_scores:
            coverage_scores = [order_scores]
    else:
        order, order_scores = random_order(n_layers, num_experts, seed), None

    # the count
    k_from = "given"
    if keep is not None:
        k_kept = int(keep)
        if k_kept > num_experts:
            raise UsageError(
                f"--keep {k_kept} is more than the model's {num_experts} experts per layer"
            )
        if k_kept < k_routed:
            raise UsageError(
                f"--keep {k_kept} is fewer than the {k_routed} experts routed per token; keep at "
                f"least {k_routed} or lower the routed count with --top-k"
            )
    elif coverage is not None:
        if not coverage_scores:
            raise UsageError("--coverage needs task scores (give --store and --task)")
        count_order = task_order if task_order is not None else order
        k_kept = coverage_count(
            float(coverage),
            count_order,
            coverage_scores,
            routed=k_routed,
            groups=groups,
            prefer_exact_groups=prefer_exact_groups,
        )
        k_from = "coverage of the task scores" if tasks else "coverage of the pooled scores"
    else:
        if bytes_for is None:
            raise UsageError("--budget needs the model's sizes (bytes_for)")
        assert budget is not None
        k_kept = budget_count(
            parse_bytes(budget),
            bytes_for,
            num_experts,
            routed=k_routed,
            groups=groups,
            prefer_exact_groups=prefer_exact_groups,
        )
        k_from = "budget"

    kept = take(order, k_kept, num_experts=num_experts, groups=groups, routed=k_routed)
    if groups[0] > 1 and not group_exact_possible(k_kept, num_experts, groups, k_routed):
        log.warning(
            "keeping %d experts per layer cannot keep the %d routing groups exact (needs a "
            "multiple of %d, at least 2 per group, and %d chosen groups supplying top-%d); the "
            "pruned model will use one group",
            k_kept,
            groups[0],
            groups[0],
            groups[1],
            k_routed,
        )
    keepsets = KeepSets.from_mapping(dict(zip(layers, kept, strict=True)))
    cover = None
    if coverage_scores:
        cover = torch.stack([kept_share(s, kept) for s in coverage_scores]).min(dim=0).values

    prov: dict[str, Any] = {
        "name": policy,
        "count": k_kept,
        "count_from": k_from,
        "keep": keep,
        "coverage": coverage,
        "budget": None if budget is None else parse_bytes(budget),
        "top_k": top_k,
        "routed": k_routed,
        "group_selection": (
            "per group"
            if groups[0] > 1 and group_exact_possible(k_kept, num_experts, groups, k_routed)
            else "global"
        ),
    }
    if len(tasks) > 1:
        prov["merge"] = merge
        prov["merge_rule"] = MERGE_DESCRIPTIONS[merge]
    if policy == "random":
        prov["seed"] = seed
    if cover is not None:
        prov["coverage_min"] = float(cover.min())
        prov["coverage_mean"] = float(cover.mean())
    return Selection(
        keep=keepsets,
        layers=layers,
        order=order,
        ranked=dict(zip(layers, kept, strict=True)),
        scores=None if order_scores is None else order_scores.to(torch.float32),
        coverage=cover,
        top_k=top_k,
        provenance=prov,
    )


# ---- non-uniform allocation ----------------------------------------------------------------------


def allocate_counts(
    scores: torch.Tensor,
    total: int,
    *,
    routed: int,
    cap: int | None = None,
) -> list[int]:
    """Per-layer keep counts summing to `total` (over all layers), more where scores are spread.

    Every layer's scores are normalised to sum to 1 and sorted; each layer first gets `routed`
    experts, then the remaining budget goes to the largest remaining normalised scores across
    all layers (the expert adding the most of its own layer's score mass next). A layer whose
    mass sits on few experts stops early; one whose mass is spread gets more. [L] counts,
    each in [routed, cap or E]. For the in-process loader (standard exports are uniform).
    """
    s = normalize_rows(scores)  # [L, E]
    n_layers, n_experts = s.shape
    cap = n_experts if cap is None else min(int(cap), n_experts)
    if not routed <= cap:
        raise UsageError(f"cap {cap} is below the routed count {routed}")
    if not n_layers * routed <= total <= n_layers * cap:
        raise UsageError(
            f"a total of {total} experts cannot give each of {n_layers} layers between "
            f"{routed} and {cap}"
        )
    ranked = torch.sort(s, dim=1, descending=True).values  # [L, E]
    counts = [routed] * n_layers
    gains = [(float(ranked[r, k]), k, r) for r in range(n_layers) for k in range(routed, cap)]
    # largest gain first; ties go to the layer with fewer experts so far, then the lower layer.
    # A layer's gains never increase with k, so its k-th is taken only after its (k-1)-th.
    gains.sort(key=lambda g: (-g[0], g[1], g[2]))
    for _gain, _k, row in gains[: total - routed * n_layers]:
        counts[row] += 1
    return counts


def select_nonuniform(
    scores: torch.Tensor,
    layers: Sequence[int],
    total: int,
    *,
    routed: int,
    cap: int | None = None,
) -> KeepSets:
    """Ragged keep sets: `allocate_counts` experts per layer, each layer's top by score."""
    counts = allocate_counts(scores, total, routed=routed, cap=cap)
    order = expert_order(scores)  # [L, E]
    return KeepSets.from_mapping(
        {int(layer): order[row, : counts[row]].tolist() for row, layer in enumerate(layers)}
    )
