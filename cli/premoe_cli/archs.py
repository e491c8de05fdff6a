"""`premoe archs`: the supported model families and what each supports."""

from __future__ import annotations

from premoe.arch import ARCHS
from premoe_cli._common import print_json, print_table
from premoe_cli.options import JsonOpt


def archs(json_out: JsonOpt = False) -> None:
    """List the supported MoE families: config keys, routing, on-disk layouts, shared experts."""
    caps = [a.capabilities() for a in ARCHS]
    if json_out:
        print_json({"families": caps})
        return
    rows = []
    for c in caps:
        r = c["routing"]
        routing = f"{r['scoring']}/{r['selection']}"
        extras = [
            name
            for name, on in (
                ("bias", r["correction_bias"]),
                ("groups", r["grouped"]),
                ("logit-bias", r["logit_bias"]),
            )
            if on
        ]
        rows.append(
            [
                c["family"],
                ",".join(c["model_types"]),
                c["num_experts_key"],
                c["top_k_key"],
                routing + (f" +{'+'.join(extras)}" if extras else ""),
                ",".join(c["layouts"]),
                ",".join(s.rsplit(".", 1)[-1] for s in c["shared_experts"]) or "-",
            ]
        )
    print_table(
        ["family", "model_type", "experts key", "top-k key", "routing", "layouts", "shared"], rows
    )
