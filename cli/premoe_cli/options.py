"""Shared typer option and argument types, defined once (huggingface_hub style)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from premoe.load.loader import ExpertQuantization
from premoe.quant.export import check_scheme

ModelArg = Annotated[
    str,
    typer.Argument(
        help="Model: a local Hugging Face checkpoint folder, or a hub id (org/name) already "
        "in the local cache.",
        show_default=False,
    ),
]
StoreOpt = Annotated[
    str, typer.Option("--store", "-s", help="Pattern store folder (made by `premoe profile`).")
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace the output if it already exists.")
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", help="Device: auto, cpu, cuda or cuda:N (auto picks cuda if present)."
    ),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Weights dtype: auto, bf16, fp16 or fp32.")]
MetricOpt = Annotated[
    str, typer.Option("--metric", "-m", help="Score metric of the store: tcess, frequency...")
]
MergeOpt = Annotated[
    str,
    typer.Option(
        help="Several tasks: 'sum' of per-layer-normalised scores, or 'union' of the tasks' "
        "own rankings (round-robin)."
    ),
]
TopKOpt = Annotated[
    int | None,
    typer.Option("--top-k", help="Lower the routed count of the pruned model (e.g. 8 -> 4)."),
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--budget",
        "-b",
        help="Memory budget, e.g. 24GiB, 500MB, 1.5e9: the largest keep count that fits.",
    ),
]
BlockOpt = Annotated[int, typer.Option(help="fp8 block size (rows and columns).")]
GroupSizeOpt = Annotated[int, typer.Option(help="int4 group size along the input.")]
RecalStepsOpt = Annotated[int, typer.Option("--recalibrate-steps", help="Router training steps.")]
RecalLrOpt = Annotated[float, typer.Option("--recalibrate-lr", help="Router learning rate (Adam).")]
CalibratedRoutersOpt = Annotated[
    bool | None,
    typer.Option(
        "--calibrated-routers/--no-calibrated-routers",
        help="Run each pattern with the store's calibrated routers for its task and kept count "
        "(`premoe export --recalibrate`), and their keep sets. Default: on when the store has "
        "calibrated routers.",
        show_default=False,
    ),
]


ResidentQuantizeOpt = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        help="Keep the experts quantized on the device: fp8 (blocks of --block) or int4 (groups "
        "of --group-size); --budget then counts quantized experts.",
        show_default=False,
    ),
]


def expert_quantization(scheme: str | None, block: int, group_size: int) -> Any:
    """The `ExpertQuantization` of `--quantize/--block/--group-size` (None without --quantize)."""
    if scheme is None:
        return None
    return ExpertQuantization(check_scheme(scheme), (block, block), group_size)
