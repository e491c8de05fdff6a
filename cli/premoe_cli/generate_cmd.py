"""`premoe generate MODEL --store STORE "prompt"`: route, load the pattern's experts, generate."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from premoe.generate import DEFAULT_COVERAGE, generate
from premoe.load.decode import DEFAULT_REROUTE_THRESHOLD, DEFAULT_WINDOW, MISS_POLICIES
from premoe_cli._common import human_bytes, print_json, progress_enabled, read_stdin
from premoe_cli.options import (
    BlockOpt,
    CalibratedRoutersOpt,
    DeviceOpt,
    DtypeOpt,
    GroupSizeOpt,
    JsonOpt,
    ModelArg,
    ResidentQuantizeOpt,
    StoreOpt,
    expert_quantization,
)
from premoe_cli.progress import LazyBar, closing


class _Bar(LazyBar):
    """Bytes loaded, fed by `progress(done, total)`; shown from the start."""

    def __init__(self) -> None:
        super().__init__()
        self.open(total=0, unit="B", unit_scale=True, desc="loading", file=sys.stderr)

    def __call__(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()


def generate_command(
    model: ModelArg,
    prompt: Annotated[
        str, typer.Argument(help="The prompt ('-' reads it from stdin).", show_default=False)
    ],
    store: StoreOpt,
    keep: Annotated[
        int | None, typer.Option("--keep", "-k", help="Experts kept per MoE layer.")
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(help="Device memory for the weights (e.g. 24GiB): keep as many as fit."),
    ] = None,
    coverage: Annotated[
        float | None,
        typer.Option(
            help=f"Keep the fewest experts covering this share of the task's scores in every "
            f"layer (default {DEFAULT_COVERAGE} when neither --keep nor --budget is given)."
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="Use this stored task (or __global__) instead of routing the prompt."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (greedy).")] = 64,
    metric: Annotated[
        str | None, typer.Option(help="Store metric that ranks experts (default: tcess).")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Below this similarity the fallback pattern is used.")
    ] = None,
    fallback: Annotated[
        str | None,
        typer.Option(help="Fallback pattern: __global__ (all tasks pooled, default) or a task."),
    ] = None,
    miss_policy: Annotated[
        str,
        typer.Option(
            help="When the pattern misses experts the full model would use: "
            f"{'|'.join(MISS_POLICIES)}. mask: the pattern only; reroute: switch patterns "
            "when the dropped mass says the "
            "pattern is wrong; fetch: exact, missing experts are fetched into the slots."
        ),
    ] = "mask",
    miss_window: Annotated[
        int, typer.Option(help="Tokens per dropped-mass check (reroute).")
    ] = DEFAULT_WINDOW,
    miss_threshold: Annotated[
        float, typer.Option(help="Mean dropped mass over a window that triggers a reroute.")
    ] = DEFAULT_REROUTE_THRESHOLD,
    reroute_context: Annotated[
        int | None,
        typer.Option(
            help="Route the last N tokens when rerouting (default: twice --miss-window; 0: all)."
        ),
    ] = None,
    host_cache: Annotated[
        str | None,
        typer.Option(help="Pinned host expert cache that fetch reads from (e.g. 16GiB)."),
    ] = None,
    measure: Annotated[
        bool,
        typer.Option(
            "--measure/--no-measure", help="Measure the dropped mass (reroute always does)."
        ),
    ] = True,
    quantize: ResidentQuantizeOpt = None,
    block: BlockOpt = 128,
    group_size: GroupSizeOpt = 128,
    calibrated_routers: CalibratedRoutersOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Route a prompt to its stored pattern, load only that pattern's experts, and generate.

    The routing key is computed on the model's prefix up to the first MoE router, with no expert
    loaded. The kept experts are read straight from the original checkpoint.

    Reports the pattern, its similarity, the resident bytes, the load time and tokens/s, and
    the dropped mass: the share of the full router's routing weight that went to experts not
    resident (mean and max over tokens; 0: the pattern held everything the full model used).

    Example: premoe generate ./Qwen3-30B-A3B --store patterns/qwen3 "Integrate x^2" --keep 32
    """
    text = read_stdin() if prompt == "-" else prompt
    with closing(_Bar() if progress_enabled() and not json_out else None) as bar:
        result = generate(
            model,
            store,
            text,
            keep=keep,
            budget=budget,
            coverage=coverage,
            task=task,
            metric=metric,
            threshold=threshold,
            fallback=fallback,
            max_new_tokens=max_new_tokens,
            device=device,
            dtype=dtype,
            progress=bar,
            miss_policy=miss_policy,
            measure=measure,
            miss_window=miss_window,
            miss_threshold=miss_threshold,
            reroute_context=reroute_context,
            host_cache=host_cache,
            quantize=expert_quantization(quantize, block, group_size),
            calibrated_routers=calibrated_routers,
        )
    if json_out:
        print_json(result.to_json())
        return
    typer.echo(result.prompt + result.text)
    typer.echo("")
    if result.routed:
        note = " (fallback)" if result.fallback else ""
        pattern = f"{result.task}{note}, similarity {result.similarity:.4f}"
    else:
        pattern = f"{result.task} (given)"
    rows = [
        ["pattern", pattern],
        ["experts kept", f"{result.keep_count} per MoE layer (top-{result.top_k} routed)"],
        ["routers", result.routers],
        [
            "resident",
            f"{human_bytes(result.resident_bytes)} of {human_bytes(result.full_bytes)} "
            f"({result.resident_bytes / max(result.full_bytes, 1):.1%})",
        ],
        [
            "route",
            f"{result.route_seconds * 1e3:.1f} ms key + search "
            f"(expert-free prefix built in {result.prefix_seconds:.2f} s)",
        ],
        ["load", f"{result.load_seconds:.2f} s ({human_bytes(result.bytes_read)} read)"],
        [
            "generate",
            f"{result.new_tokens} tokens in {result.generate_seconds:.2f} s "
            f"({result.tokens_per_second:.1f} tokens/s)",
        ],
        ["device", f"{result.device} ({result.dtype})"],
    ]
    miss = result.miss_json()
    mass = miss["dropped_mass"]
    if mass is not None:
        rows.append(
            [
                "dropped mass",
                f"prompt mean {mass['prompt']['mean']:.3f}, generated mean "
                f"{mass['generated']['mean']:.3f} max {mass['generated']['max']:.3f} "
                f"({miss['policy']})",
            ]
        )
    for sw in miss["switches"]:
        rows.append(
            [
                "reroute",
                f"at token {sw['token']}: {sw['from']} -> {sw['to']} ({sw['reason']}, window "
                f"dropped mass {sw['dropped']:.3f})",
            ]
        )
    if miss["fetch"] is not None:
        f = miss["fetch"]
        rows.append(
            [
                "fetched",
                f"{f['experts']} experts ({human_bytes(f['bytes'])}) in {f['seconds']:.2f} s",
            ]
        )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        typer.echo(f"{name.ljust(width)}  {value}")
