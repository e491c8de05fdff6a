"""What serving engines (vLLM, SGLang) require of a pruned expert count, checked up front.

Sources (../shared/reference/quantized_layouts.md §0): vLLM builds every MoE layer, the MTP
layer included, from one expert count; group-limited routers run `scores.view(T, n_group, -1)`
and, with a correction bias, a top-2 per group; `tp_size > num_experts` is an error; with EPLB
the expert count must divide by the expert-parallel size (gpt-oss always floors).
"""

from __future__ import annotations

from typing import Any

from premoe.arch.spec import ArchSpec


def engine_constraints(arch: ArchSpec, config: Any, keep: int, top_k: int | None = None) -> dict:
    """Problems an engine would hit with `keep` experts per layer, and the parallel sizes the
    result supports: {"ok", "problems", "expert_parallel_sizes", "max_tensor_parallel"}."""
    k = arch.top_k(config) if top_k is None else top_k
    problems: list[str] = []
    if keep < k:
        problems.append(f"keep {keep} < top-k {k}: every token routes {k} experts")
    n_group, topk_group = arch.groups(config)
    if n_group > 1:
        if keep % n_group:
            problems.append(f"keep {keep} is not divisible by n_group {n_group} (grouped routing)")
        elif arch.correction_bias is not None and keep // n_group < 2:
            problems.append(
                f"keep {keep} leaves {keep // n_group} expert per group; the biased group score "
                "takes the top 2 of each group"
            )
        elif topk_group * (keep // n_group) < k:
            problems.append(f"{topk_group} groups of {keep // n_group} experts cannot supply {k}")
    return {
        "ok": not problems,
        "problems": problems,
        "expert_parallel_sizes": [d for d in range(1, keep + 1) if keep % d == 0],
        "max_tensor_parallel": keep,
        "note": "one expert count for every MoE layer and the MTP layer; tensor parallelism "
        "splits expert widths, which pruning leaves unchanged",
    }
