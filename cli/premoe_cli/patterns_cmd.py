"""`premoe patterns list|show STORE`: inspect a pattern store."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from premoe.patterns import PatternStore
from premoe_cli._common import print_json, print_table
from premoe_cli.options import JsonOpt
from premoe_cli.plot_cmd import plot_command

patterns_app = typer.Typer(
    help="Inspect pattern stores made by `premoe profile`.",
    no_args_is_help=True,
    add_completion=False,
)
patterns_app.command("plot")(plot_command)

StoreArg = Annotated[
    str, typer.Argument(help="Pattern store folder (made by `premoe profile`).", show_default=False)
]


@patterns_app.command("list")
def list_command(store: StoreArg, json_out: JsonOpt = False) -> None:
    """List the tasks of a store: samples, tokens, source, creation time.

    Example: premoe patterns list patterns/qwen3
    """
    st = PatternStore.load(store)
    if json_out:
        print_json(
            {
                "premoe_version": st.premoe_version,
                "model": st.model,
                "metrics": st.metrics,
                "key": st.key,
                "tasks": {name: asdict(info) for name, info in st.tasks.items()},
            }
        )
        return
    fp = st.model
    typer.echo(
        f"{store}: {fp['family']}, {len(st.moe_layers)} MoE layers x {st.num_experts} experts "
        f"(top-{fp['top_k']}); metrics {', '.join(st.metrics)}; key {st.key['kind']}/"
        f"{st.key['search']}"
    )
    rows = [
        [name, info.samples, info.tokens, info.created, info.source]
        for name, info in st.tasks.items()
    ]
    print_table(["task", "samples", "tokens", "created", "source"], rows)


@patterns_app.command("show")
def show_command(
    store: StoreArg,
    task: Annotated[
        str | None, typer.Option("--task", "-t", help="Only this task (default: all).")
    ] = None,
    metric: Annotated[
        str | None, typer.Option("--metric", "-m", help="Metric for the table (default: first).")
    ] = None,
    top: Annotated[int, typer.Option(help="Experts listed per layer in the table.")] = 8,
    json_out: JsonOpt = False,
) -> None:
    """Show per-layer expert scores of the tasks (table: each layer's top experts).

    --json prints every metric's full [layer][expert] means:
    {"premoe_version", "model", "metrics", "tasks": {NAME: {"samples", "tokens",
    "scores": {METRIC: [[float x E] x L]}}}}, MoE layers in model order.

    Example: premoe patterns show patterns/qwen3 --task math --top 4
    """
    st = PatternStore.load(store)
    tasks = [task] if task is not None else st.task_names
    if json_out:
        print_json(st.to_json(tasks))
        return
    m = metric or st.metrics[0]
    for name in tasks:
        scores = st.scores(name, m)  # [L, E]
        info = st.tasks[name]
        typer.echo(f"\ntask {name}: {info.samples} samples, {info.tokens} tokens ({m})")
        rows = []
        for row, layer in enumerate(st.moe_layers):
            s = scores[row]
            n = min(top, s.numel())
            vals, ids = s.topk(n)
            total = float(s.sum())
            share = float(vals.sum()) / total if total > 0 else 0.0
            experts = " ".join(f"{int(e)}:{float(v):.3g}" for v, e in zip(vals, ids, strict=True))
            rows.append([layer, f"{share:.1%}", experts])
        print_table(["layer", f"top-{top} share", "expert:score"], rows)
