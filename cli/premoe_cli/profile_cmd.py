"""`premoe profile MODEL --task NAME=SOURCE ... --out STORE`: measure expert usage per task."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from premoe.profile import ProgressInfo, parse_task_specs, profile
from premoe_cli._common import print_json, print_table, progress_enabled
from premoe_cli.options import DeviceOpt, DtypeOpt, JsonOpt, ModelArg, OverwriteOpt
from premoe_cli.progress import LazyBar, closing


class _Bar(LazyBar):
    """Samples profiled, with the task and token rate."""

    def __call__(self, p: ProgressInfo) -> None:
        bar = self.open(total=p.total_samples, unit="sample", dynamic_ncols=True)
        bar.n = p.samples
        bar.set_postfix_str(f"{p.task} {p.tokens:,} tok {p.tokens_per_s:,.0f} tok/s", refresh=False)
        bar.refresh()


def profile_command(
    model: ModelArg,
    task: Annotated[
        list[str],
        typer.Option(
            "--task",
            "-t",
            help="NAME=SOURCE, repeatable. SOURCE: a .jsonl/.json file (field text, or "
            "prompt+completion/response, or chat messages), a .txt file (one sample per "
            "non-empty line), .parquet/.csv, or hf:NAME[:CONFIG][:SPLIT].",
            show_default=False,
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Pattern store folder. An existing store of the same model gets the tasks "
            "added (same name: replaced).",
            show_default=False,
        ),
    ],
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            "-m",
            help="tcess (default), frequency, paper-logits or reap; repeatable, all from one pass.",
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="TCESS confidence threshold r in [0, 1): count a routed expert only "
            "if its score >= r x the token's best score (default 0)."
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            help="Routing key: router_input (default; mean first-router input) or "
            "tcess (first-layer TCESS)."
        ),
    ] = None,
    search: Annotated[
        str | None,
        typer.Option(
            help="knn (default: one row per sample, k nearest vote) or centroid (one row per task)."
        ),
    ] = None,
    knn: Annotated[int | None, typer.Option(help="Neighbours that vote (default 15).")] = None,
    text_field: Annotated[
        str | None, typer.Option(help="Field/column holding the text (default: auto).")
    ] = None,
    max_samples: Annotated[
        int | None, typer.Option(help="At most this many samples per task (seeded choice).")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="At most this many tokens per task (seeded choice).")
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option(
            help="Truncate samples to this many tokens (default: the store's, else 512); every "
            "task of a store uses the same."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sample choice.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: Annotated[
        str | None,
        typer.Option(help="'auto': spread a model that does not fit one device (accelerate)."),
    ] = None,
    sequential: Annotated[
        bool,
        typer.Option(
            help="One decoder layer at a time on the device (GPTQ-style): profiles a model "
            "many times the device's memory; same scores."
        ),
    ] = False,
    sequential_layers: Annotated[
        int, typer.Option(help="With --sequential: decoder layers on the device at once.")
    ] = 1,
    offload_dir: Annotated[
        str | None,
        typer.Option(help="With --sequential: spill activations beyond --host-budget here."),
    ] = None,
    host_budget: Annotated[
        str | None,
        typer.Option(
            help="With --sequential: host memory for activations, e.g. 64GiB (default: half "
            "the available memory)."
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Measure how much each expert of each MoE layer is used, per task, into a pattern store.

    \b
    Example:
      premoe profile ./Qwen3-30B-A3B --task math=math.jsonl \\
        --task code=hf:org/code::train --max-samples 512 --out patterns/qwen3

    \b
    A model larger than the GPU, one layer at a time; on 8 GPUs, data-parallel:
      premoe profile ./DeepSeek-V3 --task math=math.jsonl --sequential --out st
      torchrun --nproc-per-node 8 -m premoe_cli.app profile ./Qwen3-30B-A3B \\
        --task math=math.jsonl --out st      (rank 0 writes the store)
    """
    tasks = parse_task_specs(task)
    main_rank = os.environ.get("RANK", "0") in ("", "0")
    with closing(_Bar() if progress_enabled() and main_rank else None) as bar:
        store = profile(
            model,
            tasks,
            out=out,
            overwrite=overwrite,
            metrics=metric or None,
            threshold=threshold,
            key=key,
            search=search,
            knn=knn,
            device=device,
            dtype=dtype,
            device_map=device_map,
            batch_size=batch_size,
            max_samples=max_samples,
            max_tokens=max_tokens,
            max_length=max_length,
            seed=seed,
            text_field=text_field,
            progress=bar,
            sequential=sequential or sequential_layers > 1,
            sequential_layers=sequential_layers,
            offload_dir=offload_dir,
            host_budget=host_budget,
        )
    if not main_rank:
        return
    summary = {
        "store": out,
        "metrics": store.metrics,
        "key": store.key,
        "tasks": {
            name: {"samples": store.tasks[name].samples, "tokens": store.tasks[name].tokens}
            for name in tasks
        },
    }
    if json_out:
        print_json(summary)
        return
    rows = [
        [n, store.tasks[n].samples, store.tasks[n].tokens, store.tasks[n].source] for n in tasks
    ]
    print_table(["task", "samples", "tokens", "source"], rows)
    typer.echo(
        f"store {out}: {len(store.tasks)} task(s), metrics {', '.join(store.metrics)}, "
        f"key {store.key['kind']}/{store.key['search']}"
    )
