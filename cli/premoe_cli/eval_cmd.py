"""`premoe eval MODEL --store S --task T [--keep 4,8,16] [--method ...]`: what pruning costs."""

from __future__ import annotations

from typing import Annotated

import typer

from premoe.calibrate.recalibrate import RecalibrateOptions
from premoe.eval.runner import (
    METHODS,
    NONE,
    EvalProgress,
    EvalReport,
    evaluate,
    precision_label,
)
from premoe_cli._common import human_bytes, print_json, print_table, progress_enabled
from premoe_cli.options import (
    BlockOpt,
    DeviceOpt,
    DtypeOpt,
    GroupSizeOpt,
    JsonOpt,
    ModelArg,
    RecalLrOpt,
    RecalStepsOpt,
)
from premoe_cli.progress import LazyBar, closing


class _Bar(LazyBar):
    """Rows scored (`EvalProgress`), with the stage."""

    def __call__(self, p: EvalProgress) -> None:
        bar = self.open(total=p.total, unit="row", dynamic_ncols=True, desc="eval")
        bar.total = p.total
        bar.n = p.done
        bar.set_postfix_str(p.stage, refresh=False)
        bar.refresh()


def fmt_value(kind: str, value: float | None) -> str:
    if value is None or value != value:
        return "-"
    return f"{100 * value:.1f}%" if kind == "accuracy" else f"{value:.3f}"


def print_report(report: EvalReport) -> None:
    """Per task: methods x keep counts (accuracy or perplexity), the full model, then routing;
    with several precisions, one row per (K, precision) ordered by expert memory instead."""
    for t in report.tasks:
        full = report.full[t]
        kind = full.kind
        what = "exact-match accuracy" if kind == "accuracy" else "perplexity (lower is better)"
        typer.echo(
            f"\ntask {t}: {what} on {full.n} held-out rows; full model "
            f"{fmt_value(kind, full.value)} ({human_bytes(report.full_checkpoint_bytes)})"
        )
        if report.precisions == [NONE]:
            _print_keeps(report, t)
        else:
            _print_equal_memory(report, t)
    _print_routing(report)
    typer.echo(f"\n{report.seconds:.1f} s ({report.options['via']}, {report.options['dtype']})")


def _dropped(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _print_keeps(report: EvalReport, t: str) -> None:
    """Methods x keep counts, dropped mass, resident bytes (one precision)."""
    e, kind = report.num_experts, report.full[t].kind
    headers = ["method", *[f"K={k}/{e}" for k in report.keeps]]
    rows = []
    for m in report.methods:
        rows.append([m, *[fmt_value(kind, report.row(t, m, k).score.value) for k in report.keeps]])
    size_row = [
        "resident",
        *[human_bytes(report.row(t, report.methods[0], k).checkpoint_bytes) for k in report.keeps],
    ]
    masses = [report.row(t, m, k).dropped_mass for m in report.methods for k in report.keeps]
    if any(x is not None for x in masses):  # in-process pruned models measure it
        for m in report.methods:
            rows.append(
                [
                    f"{m} dropped mass",
                    *[_dropped(report.row(t, m, k).dropped_mass) for k in report.keeps],
                ]
            )
    print_table(headers, [*rows, size_row])


def _print_equal_memory(report: EvalReport, t: str) -> None:
    """One row per (K, precision), by the kept experts' bytes: which mix wins at equal memory."""
    kind = report.full[t].kind
    combos = sorted(
        {(r.keep, r.precision) for r in report.rows if r.task == t},
        key=lambda kp: (report.row(t, report.methods[0], *kp).expert_bytes, kp),
    )
    headers = ["experts", "precision", "expert memory", "resident", *report.methods]
    has_mass = any(r.dropped_mass is not None for r in report.rows)
    if has_mass:
        headers += [f"{m} dropped mass" for m in report.methods]
    rows = []
    for k, p in combos:
        first = report.row(t, report.methods[0], k, p)
        row = [
            f"{k}/{report.num_experts}",
            precision_label(p, report.options.get("source_dtype")),
            human_bytes(first.expert_bytes),
            human_bytes(first.checkpoint_bytes),
            *[fmt_value(kind, report.row(t, m, k, p).score.value) for m in report.methods],
        ]
        if has_mass:
            row += [_dropped(report.row(t, m, k, p).dropped_mass) for m in report.methods]
        rows.append(row)
    typer.echo("at equal memory (rows by the kept experts' bytes at their precision):")
    print_table(headers, rows)


def _print_routing(report: EvalReport) -> None:
    if report.routing is not None and report.routing.per_task:
        r = report.routing
        key = f"{r.key.get('kind')}/{r.key.get('search')}"
        typer.echo(
            f"\nrouting (key {key}): {fmt_value('accuracy', r.accuracy)} of {r.n} held-out "
            "queries routed to their own task"
        )
        rows = []
        for t, v in r.per_task.items():
            wrong = ", ".join(f"{x} {n}" for x, n in v["routed"].items() if x != t) or "-"
            rows.append([t, v["n"], fmt_value("accuracy", v["accuracy"]), wrong])
        print_table(["task", "queries", "routed to own task", "routed elsewhere"], rows)


def eval_command(
    model: ModelArg,
    task: Annotated[
        list[str],
        typer.Option("--task", "-t", help="Task to evaluate; repeatable.", show_default=False),
    ],
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            "-s",
            help="Pattern store of this model (made by `premoe profile`); needed by every "
            "method but random.",
        ),
    ] = None,
    keep: Annotated[
        str | None,
        typer.Option(
            "--keep",
            "-k",
            help="Experts kept per MoE layer, comma-separated (default: top-k, powers of two, "
            "all).",
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            "-m",
            help=f"Comma-separated, from {', '.join(METHODS)} (default: every metric in the "
            "store, global, random). A metric keeps the task's top K by that metric; global "
            "the top K of all tasks pooled; random a seeded random K; routed routes each query "
            "(TAER) and keeps the top K of the pattern it gets.",
        ),
    ] = None,
    eval_set: Annotated[
        list[str] | None,
        typer.Option(
            "--eval-set",
            "-e",
            help="[TASK=]FILE, repeatable: held-out rows (.jsonl with prompt and answer: "
            "exact-match accuracy; with text only, or .txt: perplexity). A FILE without TASK= "
            "is split by its rows' task field. Default: the bundled demo task's eval split.",
            show_default=False,
        ),
    ] = None,
    max_samples: Annotated[
        int | None, typer.Option(help="At most this many rows per task (seeded choice).")
    ] = 100,
    via: Annotated[
        str,
        typer.Option(
            help="load: build the pruned model in process (fast); export: write a pruned "
            "checkpoint and read it back with from_pretrained."
        ),
    ] = "load",
    batch_size: Annotated[
        int | None, typer.Option(help="Rows per batch (default 64; perplexity 8).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest generated answer, in tokens.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the random method and row choice.")] = 0,
    routing: Annotated[
        bool, typer.Option(help="Also measure routing accuracy (needs the store).")
    ] = True,
    threads: Annotated[
        int | None,
        typer.Option(help="torch CPU threads (1 is fastest for small models on a busy CPU)."),
    ] = None,
    plot: Annotated[
        str | None,
        typer.Option("--plot", help="Write a PNG: accuracy vs experts kept, one line per method."),
    ] = None,
    predictions: Annotated[
        bool, typer.Option(help="With --json: include every generated answer.")
    ] = False,
    recalibrate: Annotated[
        bool,
        typer.Option(
            "--recalibrate",
            help="Also score every method (but random and routed) with its routers "
            "recalibrated to the full model on the task's corpus (rows METHOD+recal).",
        ),
    ] = False,
    recalibrate_steps: RecalStepsOpt = RecalibrateOptions.steps,
    recalibrate_lr: RecalLrOpt = RecalibrateOptions.lr,
    calibration: Annotated[
        list[str] | None,
        typer.Option(
            "--calibration",
            help="TASK=FILE, repeatable: the corpus recon and --recalibrate use (default: the "
            "corpus the task was profiled on, as the store recorded it).",
            show_default=False,
        ),
    ] = None,
    quantize: Annotated[
        str,
        typer.Option(
            "--quantize",
            help="Precisions of the kept experts, comma-separated from none, fp8 (blocks of "
            "--block), int4 (groups of --group-size): every method and K is scored at each, "
            "with the experts resident quantized, and the table compares them at equal memory.",
        ),
    ] = NONE,
    block: BlockOpt = 128,
    group_size: GroupSizeOpt = 128,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --plot file.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Measure accuracy (or perplexity) retained versus experts kept, per task and method.

    Scores the full model and, for every keep count and method, the pruned model, on each
    task's held-out set: greedy exact match (stop at end-of-sequence or newline) when rows have
    prompt and answer, else perplexity of their text. Also reports routing accuracy: how often
    a held-out query routes to its own task's pattern.

    \b
    Example:
      premoe eval premoe/demo/model --store patterns/demo --task add --task sort \\
        --keep 4,8,16 --method tcess,global,random --plot eval.png
      premoe eval premoe/demo/model --store patterns/demo --task add --method tcess \\
        --keep 16,32,64 --quantize none,int4 --group-size 32
    """
    if plot is not None:  # before any work: the plot is written after the whole evaluation
        from premoe.errors import UsageError
        from premoe.eval.plots import check_matplotlib
        from premoe.io.atomic import check_output_file

        check_matplotlib()
        if not plot.lower().endswith(".png"):
            raise UsageError(f"--plot {plot}: the plot is a PNG; give a path ending in .png")
        inputs = [("model folder", model), ("pattern store", store)]
        inputs += [("eval set", e.partition("=")[2] or e) for e in eval_set or []]
        check_output_file(plot, overwrite=overwrite, inputs=inputs)
    with closing(_Bar() if progress_enabled() and not json_out else None) as bar:
        report = evaluate(
            model,
            store,
            task,
            keeps=keep,
            methods=method,
            eval_sets=eval_set or None,
            max_samples=max_samples,
            device=device,
            dtype=dtype,
            via=via,
            seed=seed,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            routing=routing,
            threads=threads,
            progress=bar,
            recalibrate=recalibrate,
            recalibrate_options=RecalibrateOptions(steps=recalibrate_steps, lr=recalibrate_lr),
            calibration=_calibration(calibration or [], task),
            quantize=quantize,
            block=block,
            group_size=group_size,
        )
    plot_path = None
    if plot is not None:
        from premoe.eval.plots import plot_eval

        plot_path = plot_eval(report, plot, overwrite=overwrite)
    if json_out:
        data = report.to_json(predictions=predictions)
        data["plot"] = None if plot_path is None else str(plot_path)
        print_json(data)
        return
    print_report(report)
    if plot_path is not None:
        typer.echo(f"plot: {plot_path}")


def _calibration(specs: list[str], tasks: list[str]) -> dict[str, str] | None:
    from premoe.errors import UsageError

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or name not in tasks:
            raise UsageError(f"--calibration {spec!r}: write TASK=FILE with an evaluated task")
        out[name] = path
    return out or None
