"""`premoe inspect MODEL`: what premoe sees in a model, and whether a keep set applies."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from premoe.fingerprint import fingerprint_source
from premoe.prune import KeepSets
from premoe.source import resolve_model
from premoe_cli._common import human_bytes, print_json, print_table
from premoe_cli.options import JsonOpt, ModelArg


def parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated expert ids, got {text!r}") from None


def _format_row(w: dict[str, Any]) -> str:
    if w["format"] == "dense":
        return "dense"
    return f"{w['format']} ({w['quant_method']}): {', '.join(w['expert_components'])}"


def inspect(
    model: ModelArg,
    keep: Annotated[
        str | None,
        typer.Option(help="Check a keep set: comma-separated expert ids kept in every MoE layer."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show a model's MoE family, layers, expert counts, checkpoint layout and fingerprint."""
    src = resolve_model(model)
    km = src.keymap
    info: dict[str, Any] = {
        "path": str(src.path),
        "fingerprint": fingerprint_source(src),
        "layout": km.layout,
        "weights": km.summary(),
        "checkpoint_bytes": sum(src.reader.shard_sizes().values()),
        "shards": len(src.reader.shard_sizes()),
    }
    if keep is not None:
        ks = KeepSets.uniform(src.moe_layers, parse_ids(keep))
        plan = ks.validate(src.arch, src.config)
        info["keep"] = {"experts": list(ks.layers[src.moe_layers[0]]), "group_exact": plan.exact}
    src.close()
    if json_out:
        print_json(info)
        return
    fp = info["fingerprint"]
    rows = [
        ["family", fp["family"]],
        ["MoE layers", f"{len(fp['moe_layers'])} of {fp['num_layers']}"],
        ["experts / top-k", f"{fp['num_experts']} / {fp['top_k']}"],
        ["layout on disk", info["layout"]],
        ["weight format", _format_row(info["weights"])],
        ["MTP layers", str(info["weights"]["mtp_layers"] or "none")],
        ["checkpoint", f"{human_bytes(info['checkpoint_bytes'])} in {info['shards']} shard(s)"],
        ["config hash", fp["config_hash"]],
        ["router hash", fp["router_hash"]],
    ]
    if "keep" in info:
        rows.append(["keep set", f"{info['keep']['experts']} (valid)"])
    print_table(["", str(src.path)], rows)
