"""`premoe export MODEL --store S --task T --keep K --out DIR`: write a pruned checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from premoe.calibrate.pipeline import DEFAULT_SELECTION, calibrate_pattern, export_calibrated
from premoe.calibrate.recalibrate import RecalibrateOptions
from premoe.errors import UsageError
from premoe.export import export_from_store
from premoe.policy import parse_bytes
from premoe.quant.export import ExpertQuantizer, check_scheme
from premoe_cli._common import human_bytes, print_json, print_table, progress_enabled
from premoe_cli.options import (
    BlockOpt,
    BudgetOpt,
    DeviceOpt,
    DtypeOpt,
    GroupSizeOpt,
    JsonOpt,
    MergeOpt,
    MetricOpt,
    ModelArg,
    OverwriteOpt,
    RecalLrOpt,
    RecalStepsOpt,
    TopKOpt,
)
from premoe_cli.progress import LazyBar, closing


class _Bar(LazyBar):
    """Bytes written, fed by `progress(done, total)`."""

    def __call__(self, done: int, total: int) -> None:
        bar = self.open(
            total=total or None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            dynamic_ncols=True,
            desc="export",
        )
        bar.update(done - bar.n)


def export_command(
    model: ModelArg,
    out: Annotated[
        str, typer.Option("--out", "-o", help="Output folder (must not exist).", show_default=False)
    ],
    store: Annotated[
        str | None,
        typer.Option(
            "--store", "-s", help="Pattern store (made by `premoe profile` for this model)."
        ),
    ] = None,
    task: Annotated[
        list[str] | None,
        typer.Option(
            "--task",
            "-t",
            help="Task whose experts to keep; repeatable (merged with --merge).",
            show_default=False,
        ),
    ] = None,
    keep: Annotated[
        int | None, typer.Option("--keep", "-k", help="Experts kept per MoE layer.")
    ] = None,
    coverage: Annotated[
        float | None,
        typer.Option(
            "--coverage",
            "-c",
            help="Keep the fewest experts whose scores cover this fraction (0-1] of every "
            "layer's total.",
        ),
    ] = None,
    budget: BudgetOpt = None,
    top_k: TopKOpt = None,
    metric: MetricOpt = "tcess",
    merge: MergeOpt = "sum",
    policy: Annotated[
        str,
        typer.Option(
            help="task (the task's scores), global (all tasks pooled) or random (seeded); "
            "the baselines use the task's keep count."
        ),
    ] = "task",
    seed: Annotated[int, typer.Option(help="Seed of the random policy.")] = 0,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="hf: a Hugging Face checkpoint; expert-list: per-layer ranked expert lists "
            "(JSON lines) for engines that mask experts at load time.",
        ),
    ] = "hf",
    max_shard_size: Annotated[
        str, typer.Option(help="Largest output shard, e.g. 5GiB or 500MB.")
    ] = "5GiB",
    drop_mtp: Annotated[
        bool,
        typer.Option(
            "--drop-mtp",
            help="Remove the multi-token-prediction layer (DeepSeek-V3/GLM-4.5 layer N, "
            "Qwen3-Next mtp.*) and set its count to 0, instead of pruning it to the same K.",
        ),
    ] = False,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="Quantize the kept routed experts: fp8 (DeepSeek fp8 block layout, "
            "weight_scale_inv per --block) or int4 (compressed-tensors W4A16 pack-quantized, "
            "--group-size). Everything else stays in the source dtype.",
            show_default=False,
        ),
    ] = None,
    block: BlockOpt = 128,
    group_size: GroupSizeOpt = 128,
    recalibrate: Annotated[
        bool,
        typer.Option(
            "--recalibrate",
            help="Better quality at the same size: choose the experts by how well the pruned "
            "layers reproduce the full ones on the task's corpus (--select recon), then "
            "retrain only the router weights to match the full model (KL); expert weights never "
            "change. The calibrated routers are also kept in the store for load/serve.",
        ),
    ] = False,
    select: Annotated[
        str | None,
        typer.Option(
            "--select",
            help="With --recalibrate: recon (default), or a store metric (tcess, reap, "
            "paper-logits, frequency).",
        ),
    ] = None,
    sequential: Annotated[
        bool,
        typer.Option(
            "--sequential",
            help="With --recalibrate, for models that do not fit the device: fit the routers "
            "layer by layer with one decoder layer on the device at a time (each MoE block's "
            "output matched, --recalibrate-steps per layer), as profile --sequential does; the "
            "experts come from a store metric (--select, default tcess).",
        ),
    ] = False,
    recalibrate_steps: RecalStepsOpt = RecalibrateOptions.steps,
    recalibrate_lr: RecalLrOpt = RecalibrateOptions.lr,
    calibration: Annotated[
        list[str] | None,
        typer.Option(
            "--calibration",
            help="Calibration corpus [TASK=]FILE (default: the corpus each task was profiled "
            "on, as the store recorded it).",
            show_default=False,
        ),
    ] = None,
    save_routers: Annotated[
        bool,
        typer.Option(
            "--save-routers/--no-save-routers",
            help="Keep the calibrated routers in the store (one task).",
        ),
    ] = True,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a pruned checkpoint that keeps, per MoE layer, the experts a task uses most.

    Reads only the kept experts' bytes from MODEL, shard by shard. The output folder gets the
    pruned weights in the source's own format (bf16, fp8 block, MXFP4, compressed-tensors,
    GPTQ, AWQ: every expert moves with its scales, nothing is re-quantized), the rewritten
    config.json, the tokenizer and generation files, and premoe.json (provenance). MTP layers
    are pruned to the same K (or removed with --drop-mtp). Give exactly one of --keep,
    --coverage or --budget.

    Example:

        premoe export ./Qwen3-30B-A3B -s patterns/qwen3 -t math --keep 64 -o ./qwen3-math
    """
    max_shard = parse_bytes(max_shard_size)
    quantizer = None
    if quantize is not None:
        quantizer = ExpertQuantizer(
            check_scheme(quantize),
            block=(block, block),
            group_size=group_size,
            symmetric=True,  # transformers cannot load asymmetric int4 MoE experts (5.25)
        )
    if select is not None and not recalibrate:
        raise UsageError("--select needs --recalibrate (without it, --metric picks the scores)")
    if sequential and not recalibrate:
        raise UsageError("--sequential needs --recalibrate (a plain export never loads the model)")
    if recalibrate:
        result = _export_recalibrated(
            model,
            out,
            store,
            task or [],
            keep=keep,
            coverage=coverage,
            budget=budget,
            top_k=top_k,
            select=select or ("tcess" if sequential else DEFAULT_SELECTION),
            sequential=sequential,
            policy=policy,
            format=format,
            options=RecalibrateOptions(steps=recalibrate_steps, lr=recalibrate_lr),
            calibration=calibration or [],
            save=save_routers,
            device=device,
            dtype=dtype,
            overwrite=overwrite,
            max_shard=max_shard,
            drop_mtp=drop_mtp,
            quantize=quantizer,
        )
    else:
        result = None
    with closing(_Bar() if progress_enabled() and result is None else None) as bar:
        result = result or export_from_store(
            model,
            store,
            task or [],
            out,
            keep=keep,
            coverage=coverage,
            budget=budget,
            top_k=top_k,
            metric=metric,
            policy=policy,
            merge=merge,
            seed=seed,
            overwrite=overwrite,
            format=format,
            max_shard_bytes=max_shard,
            progress=bar,
            drop_mtp=drop_mtp,
            quantize=quantizer,
        )
    summary = result.summary()
    summary["group_plan"] = result.provenance["groups"]
    summary["policy"] = result.provenance.get("policy")
    for key in ("weights", "mtp", "engines", "quantized"):
        summary[key] = result.provenance.get(key)
    recal = result.provenance.get("recalibration")
    if recal is not None:
        summary["recalibration"] = recal
    if json_out:
        print_json(summary)
        return
    exact = result.group_plan
    rows = [
        ["experts kept", f"{result.keep_count} of {result.num_experts} per MoE layer"],
        ["routed per token", str(result.top_k)],
        ["MoE layers", str(result.moe_layers)],
    ]
    if result.format == "hf":
        rows += [
            ["bytes written", f"{human_bytes(result.tensor_bytes)} in {result.shards} shard(s)"],
            ["of the full model", f"{result.fraction:.1%} of {human_bytes(result.source_bytes)}"],
            ["read from source", human_bytes(result.bytes_read)],
        ]
    if not exact.exact:
        rows.append(["group routing", f"one group (fallback: {exact.reason})"])
    weights, mtp = result.provenance.get("weights") or {}, result.provenance.get("mtp") or {}
    quantized = result.provenance.get("quantized")
    if quantized:
        rows.append(["weight format", f"experts quantized to {quantized['scheme']}"])
    elif weights:
        rows.append(["weight format", f"{weights['format']} (kept as in the source)"])
    if mtp.get("layers"):
        how = mtp["action"] + (f" by {mtp['rule']}" if mtp.get("rule") else "")
        rows.append(["MTP layers", f"{mtp['layers']} {how}"])
    engines = result.provenance.get("engines") or {}
    if engines:
        eps = ",".join(map(str, engines["expert_parallel_sizes"]))
        ok = "ok" if engines["ok"] else "; ".join(engines["problems"])
        rows.append(["vLLM/SGLang", f"{ok}; expert-parallel sizes {eps}"])
    if recal is not None:
        rows += [
            ["selection", str(result.provenance["selection"]["name"])],
            [
                "router KL",
                f"{recal['kl_before']:.4f} -> {recal['kl_after']:.4f} nats/token "
                f"({recal['tokens']} tokens)",
            ],
            ["routers stored as", str(recal.get("stored_as") or "-")],
        ]
    rows += [["time", f"{result.seconds:.1f} s"], ["written to", str(result.out)]]
    print_table(["export", result.format], rows)


def _calibration_map(specs: list[str], tasks: list[str]) -> dict[str, str] | str | None:
    """``--calibration [TASK=]FILE`` values -> {task: FILE} (or one FILE for every task)."""
    from pathlib import Path

    if not specs:
        return None
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and name in tasks and not Path(spec).exists():
            out[name] = path
        elif len(specs) == 1:
            return spec
        else:
            raise UsageError(f"--calibration {spec!r}: write TASK=FILE with one of the tasks")
    return out


def _export_recalibrated(
    model: str,
    out: str,
    store: str | None,
    tasks: list[str],
    *,
    keep: int | None,
    coverage: float | None,
    budget: str | None,
    top_k: int | None,
    select: str,
    policy: str,
    format: str,
    options: RecalibrateOptions,
    calibration: list[str],
    save: bool,
    device: str,
    dtype: str,
    overwrite: bool,
    max_shard: int,
    drop_mtp: bool = False,
    quantize: ExpertQuantizer | None = None,
    sequential: bool = False,
):  # noqa: ANN202
    from premoe.export import check_output
    from premoe.source import resolve_model

    if store is None or not tasks:
        raise UsageError("--recalibrate needs --store and --task (the task's corpus)")
    if policy != "task" or top_k is not None or format != "hf":
        raise UsageError("--recalibrate works with the task policy, hf format and no --top-k")
    src = resolve_model(model)
    try:
        check_output(out, src.path, overwrite=overwrite)
        pattern = calibrate_pattern(
            src,
            store,
            tasks,
            keep=keep,
            coverage=coverage,
            budget=budget,
            select=select,
            options=options,
            corpus=_calibration_map(calibration, tasks),
            device=device,
            dtype=dtype,
            save=save and len(tasks) == 1,
            sequential=sequential,
        )
        return export_calibrated(
            src,
            pattern,
            out,
            provenance={
                "tasks": tasks,
                "store": {"path": store},
                "policy": pattern.selection.provenance,
            },
            overwrite=overwrite,
            max_shard_bytes=max_shard,
            drop_mtp=drop_mtp,
            quantize=quantize,
        )
    finally:
        src.close()
