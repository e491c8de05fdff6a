"""`premoe plan MODEL [--store S --task T] [--budget 24GiB]`: what fits, per keep count."""

from __future__ import annotations

from typing import Annotated

import typer

from premoe.plan import PRECISIONS, plan
from premoe.runtime import parse_dtype
from premoe_cli._common import human_bytes, print_json, print_table
from premoe_cli.options import BudgetOpt, JsonOpt, MergeOpt, MetricOpt, ModelArg, TopKOpt

TaskOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--task",
        "-t",
        help="Task of the store to measure score coverage on; repeatable (merged with --merge). "
        "Without --task the store's pooled scores are used.",
        show_default=False,
    ),
]


def plan_command(
    model: ModelArg,
    store: Annotated[
        str | None,
        typer.Option("--store", "-s", help="Pattern store: adds per-layer score coverage."),
    ] = None,
    task: TaskOpt = None,
    metric: MetricOpt = "tcess",
    merge: MergeOpt = "sum",
    budget: BudgetOpt = None,
    top_k: TopKOpt = None,
    keep: Annotated[
        list[int] | None,
        typer.Option("--keep", "-k", help="Add this keep count to the table; repeatable."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help="Count resident bytes as `load`/`generate`/`serve` hold them in this dtype "
            "(bf16, fp16, fp32; quantized checkpoints dequantized); default: the checkpoint's "
            "own bytes, as an export holds them.",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Resident bytes per keep count (experts kept per MoE layer), from checkpoint headers.

    For each keep count K (top-k, powers of two, all experts): expert and non-expert bytes,
    the fraction of the full model, the predicted export size, and with a store the share of
    the task's scores that the kept experts cover (min and mean over layers).

    With --budget, a second table gives per expert precision (source, fp8, int4: what
    `export --quantize` writes) the largest K within the same budget and the coverage it keeps,
    and recommends one: the highest precision within 0.01 of the best mean coverage.

    Example:

        premoe plan ./Qwen3-30B-A3B --store patterns/qwen3 --task math --budget 24GiB
    """
    if (task or merge != "sum") and store is None:
        raise typer.BadParameter("--task and --merge need --store")
    p = plan(
        model,
        store=store,
        tasks=task or [],
        metric=metric,
        merge=merge,
        budget=budget,
        top_k=top_k,
        keeps=keep or [],
        precisions=PRECISIONS if budget is not None else (),
        dtype=None if dtype is None else parse_dtype(dtype),
    )
    if json_out:
        print_json(p.to_json())
        return
    headers = ["keep", "experts", "non-expert", "resident", "of full", "export size"]
    if store is not None:
        headers += ["coverage min", "coverage mean"]
    rows = []
    for r in p.rows:
        mark = " *" if p.fits == r.keep else ""
        notes = ("" if r.group_exact else " (1 group)") + ("" if r.engine_ok else " (!vLLM)")
        row = [
            f"{r.keep}/{p.num_experts}{mark}" + notes,
            human_bytes(r.expert_bytes),
            human_bytes(r.non_expert_bytes),
            human_bytes(r.resident_bytes),
            f"{r.fraction:.1%}",
            human_bytes(r.file_bytes),
        ]
        if store is not None:
            row += [f"{r.coverage_min:.3f}", f"{r.coverage_mean:.3f}"]
        rows.append(row)
    typer.echo(
        f"{p.model}: {p.family}, {len(p.moe_layers)} MoE layers x {p.num_experts} experts, "
        f"top-{p.top_k}, full model {human_bytes(p.full_bytes)}"
        + (f" in {p.dtype}" if p.dtype else "")
    )
    print_table(headers, rows)
    if p.budget is not None:
        typer.echo(
            f"* largest keep count within {human_bytes(p.budget)}: {p.fits} of {p.num_experts} "
            f"experts per layer ({human_bytes(p.row(p.fits).resident_bytes)})"
            if p.fits
            else ""
        )
        if p.engines:
            eng = p.engines
            ok = "ok" if eng["ok"] else "; ".join(eng["problems"])
            eps = ",".join(map(str, eng["expert_parallel_sizes"]))
            typer.echo(f"  vLLM/SGLang with keep {p.fits}: {ok}; expert-parallel sizes {eps}")
    if p.precisions:
        headers = ["precision", "per expert", "keep", "resident"]
        if store is not None:
            headers += ["coverage min", "coverage mean"]
        rows = []
        for r in p.precisions:
            mark = " <" if p.recommended is not None and r is p.recommended else ""
            row = [
                r.precision + mark,
                human_bytes(r.expert_per_k),
                f"{r.keep}/{p.num_experts}" if r.keep else "does not fit",
                human_bytes(r.resident_bytes) if r.resident_bytes else "-",
            ]
            if store is not None:
                row += [
                    f"{r.coverage_min:.3f}" if r.coverage_min is not None else "-",
                    f"{r.coverage_mean:.3f}" if r.coverage_mean is not None else "-",
                ]
            rows.append(row)
        typer.echo(f"at equal memory ({human_bytes(p.budget or 0)}), per expert precision:")
        print_table(headers, rows)
        rec = p.recommended
        if rec is not None:
            flag = "" if rec.precision == "source" else f" --quantize {rec.precision}"
            typer.echo(
                f"< recommended: {rec.precision} experts, keep {rec.keep}/{p.num_experts} "
                f"(export --keep {rec.keep}{flag})"
            )
