"""Shared typer option and argument types, defined once (huggingface_hub style)."""

from __future__ import annotations

from typing import Annotated

import typer

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
