"""`premoe patterns plot STORE [--out DIR]`: PNG heatmaps, task overlap and coverage curves."""

from __future__ import annotations

from typing import Annotated

import typer

from premoe_cli._common import print_json, print_table
from premoe_cli.options import JsonOpt, OverwriteOpt


def plot_command(
    store: Annotated[
        str,
        typer.Argument(help="Pattern store folder (made by `premoe profile`).", show_default=False),
    ],
    out: Annotated[
        str, typer.Option("--out", "-o", help="Folder for the PNG files (created if needed).")
    ] = "premoe-plots",
    metric: Annotated[
        str | None,
        typer.Option("--metric", "-m", help="Score metric of the store (default: tcess)."),
    ] = None,
    keep: Annotated[
        int | None,
        typer.Option(
            "--keep",
            "-k",
            help="Kept experts per layer for the overlap matrix (default: a quarter of the "
            "experts, at least top-k).",
        ),
    ] = None,
    task: Annotated[
        list[str] | None,
        typer.Option("--task", "-t", help="Only these tasks; repeatable (default: all)."),
    ] = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Plot a store's patterns: heatmaps.png (per-task expert usage by layer), overlap.png
    (Jaccard of the tasks' kept sets at --keep, mean over layers), coverage.png (share of each
    layer's score kept versus K, per task and pooled).

    \b
    Example:
      premoe patterns plot patterns/demo --out plots --keep 8
    """
    from premoe.eval.plots import plot_patterns

    paths = plot_patterns(store, out, metric=metric, keep=keep, tasks=task, overwrite=overwrite)
    if json_out:
        print_json({name: str(p) for name, p in paths.items()})
        return
    print_table(["plot", "file"], [[name, str(p)] for name, p in paths.items()])
