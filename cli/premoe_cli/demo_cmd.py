"""`premoe demo`: the whole pipeline on the bundled model, on the CPU, with no download."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer

from premoe_cli._common import human_bytes, print_json, print_table, progress_enabled
from premoe_cli.options import JsonOpt, OverwriteOpt
from premoe_cli.progress import LazyBar, closing


class _Bar(LazyBar):
    """The demo's steps; full when it closes."""

    def __call__(self, p: Any) -> None:
        bar = self.open(total=p.steps, unit="step", dynamic_ncols=True, desc="demo")
        bar.n = p.index - 1
        bar.set_description_str(f"demo: {p.step}", refresh=False)
        bar.set_postfix_str(p.detail, refresh=False)
        bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = self.bar.total
            self.bar.refresh()
        super().close()


def demo_command(
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="Output folder (default ./premoe-demo; if that exists, a fresh timestamped "
            "folder next to it). An explicit --out that exists needs --overwrite.",
            show_default=False,
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Fewer samples and one keep count (a smoke run).")
    ] = False,
    keep: Annotated[
        int | None,
        typer.Option(
            "--keep",
            "-k",
            help="Experts kept per layer in the summary (default: a quarter of the experts).",
        ),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            "-s",
            help="Reuse this pattern store of the bundled model (e.g. patterns/demo) instead of "
            "profiling; its fingerprint is checked.",
        ),
    ] = None,
    threads: Annotated[
        int, typer.Option(help="torch CPU threads (1 is fastest for this tiny model).")
    ] = 1,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Run premoe end to end on the bundled demo MoE (CPU, no download, a few minutes).

    Writes the task suite, profiles the tasks into a pattern store, routes example prompts,
    exports a pruned checkpoint for one task, then evaluates the full model against pruned
    models that keep each task's own experts, the experts TAER routes to, the experts of all
    tasks pooled, and random experts; prints one summary table and where the plots are.

    \b
    Example:
      premoe demo
      premoe demo --quick --out /tmp/demo --json
    """
    from premoe.eval.demo import DemoOptions, run_demo

    base = DemoOptions.quick() if quick else DemoOptions()
    changes: dict[str, Any] = {"threads": threads}
    if keep is not None:
        changes["keep"] = keep
    opts = dataclasses.replace(base, **changes)
    with closing(_Bar() if progress_enabled() and not json_out else None) as bar:
        result = run_demo(out, overwrite=overwrite, store=store, options=opts, progress=bar)
    if json_out:
        print_json(result.to_json())
        return
    _print_result(result)


def _print_result(result: Any) -> None:
    from premoe.eval.demo import equal_memory_table, summary_table

    e = result.num_experts
    typer.echo(
        f"premoe demo: bundled {result.fingerprint.get('family')} model, "
        f"{len(result.fingerprint.get('moe_layers', []))} MoE layers x {e} experts "
        f"(top-{result.top_k}), {len(result.tasks)} tasks: {', '.join(result.tasks)}"
    )
    typer.echo(f"output: {result.out_note}")
    st = result.store
    verb = "reused" if st["reused"] else "profiled"
    samples = sum(st["samples"].values())
    tokens = sum(st["tokens"].values())
    typer.echo(
        f"\n1. pattern store ({verb}): {samples} samples, {tokens:,} tokens, metrics "
        f"{', '.join(st['metrics'])} -> {st['path']}"
    )
    typer.echo("\n2. routing held-out prompts (key: first MoE router's input, no expert run)")
    print_table(
        ["prompt", "task", "routed to", "similarity", "runner-up"],
        [
            [
                repr(x["prompt"]),
                x["task"],
                x["routed"] + ("" if x["correct"] else "  (wrong)"),
                f"{x['similarity']:.3f}",
                "-"
                if x["runner_up"] is None
                else f"{x['runner_up']['task']} {x['runner_up']['similarity']:.3f}",
            ]
            for x in result.examples
        ],
    )
    ex = result.export
    typer.echo(
        f"\n3. exported the {ex['task']!r} pattern, {ex['experts_kept']} of {e} experts per "
        f"layer: {human_bytes(ex['bytes_written'])} of {human_bytes(ex['source_bytes'])} "
        f"({ex['fraction']:.1%}); plain from_pretrained of it scores "
        f"{100 * ex['accuracy']:.1f}% on {ex['n']} held-out {ex['task']} prompts -> {ex['out']}"
    )
    rc = ex.get("recalibrated")
    if rc:
        typer.echo(
            f"   the same size with `premoe export --recalibrate` (experts chosen by "
            f"{rc['selection']}, routers recalibrated, KL {rc['kl_before']:.3f} -> "
            f"{rc['kl_after']:.3f}): {100 * rc['accuracy']:.1f}% (TCESS {100 * ex['accuracy']:.1f}"
            f"%) -> {rc['out']}"
        )
    n_eval = result.options["n_eval"]
    typer.echo(
        f"\n4. summary at {result.keep} of {e} experts per layer: exact-match accuracy, mean of "
        f"{len(result.tasks)} tasks x {n_eval} held-out prompts"
    )
    headers, rows = summary_table(result)
    print_table(headers, rows)
    if result.equal_memory:
        typer.echo(
            "\n5. at equal memory: the task's own pattern (TCESS), fewer experts in the "
            f"checkpoint's dtype or more of them kept in {result.options['equal_memory']}, "
            "by the memory of the kept experts"
        )
        headers, rows = equal_memory_table(result)
        print_table(headers, rows)
    if result.plots:
        typer.echo("\nplots:")
        for name, path in result.plots.items():
            typer.echo(f"  {name}: {path}")
    else:
        typer.echo("\nno plots: matplotlib is not installed (pip install 'premoe[plot]')")
    typer.echo(f"details: {result.out / 'demo.json'}  ({result.seconds:.0f} s)")
