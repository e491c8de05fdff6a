"""Per-layer ranked expert lists as JSON lines, for engines that mask experts at load time.

One line per MoE layer, in layer order:

    {"layer": 3, "kept": 4, "experts": [6, 1, 4, 0, 7, 2, 3, 5], "scores": [0.31, 0.22, ...]}

`experts` ranks ALL of the layer's experts (original ids): the `kept` experts of the keep set
first, best first, then the dropped ones, best first, so an engine that keeps "the first N" of
every line gets exactly the keep set for N = `kept`. `scores` are aligned with `experts` (the
policy's scores; null for the random baseline).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from premoe.errors import UsageError
from premoe.prune import KeepSets

EXPERT_LIST_NAME = "experts.jsonl"


def expert_list_lines(
    keep: KeepSets,
    num_experts: int,
    *,
    order: torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
    scores: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """The JSON objects of an expert list.

    `order` `[L, E]` (best first) and `scores` `[L, E]` come from a policy (`Selection`), with
    `layers` naming their rows; without them experts are listed by id.
    """
    rows = {layer: n for n, layer in enumerate(layers or [])}
    out = []
    for layer, kept_ids in sorted(keep.layers.items()):
        if order is not None and layer in rows:
            ranking = [int(e) for e in order[rows[layer]].tolist()]
        else:
            ranking = list(range(num_experts))
        kept = set(kept_ids)
        ranked = [e for e in ranking if e in kept] + [e for e in ranking if e not in kept]
        line: dict[str, Any] = {"layer": int(layer), "kept": len(kept_ids), "experts": ranked}
        if scores is not None and layer in rows:
            row = scores[rows[layer]].tolist()
            line["scores"] = [float(row[e]) for e in ranked]
        else:
            line["scores"] = None
        out.append(line)
    return out


def format_expert_list(lines: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)


def read_expert_list(path: str | Path) -> tuple[KeepSets, dict[int, list[int]]]:
    """(keep sets, full ranking per layer) from an expert list file or export folder."""
    path = Path(path)
    if path.is_dir():
        path = path / EXPERT_LIST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot read expert list {path}: {err.strerror or err}") from None
    keep: dict[int, list[int]] = {}
    ranking: dict[int, list[int]] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            layer, kept, experts = int(line["layer"]), int(line["kept"]), line["experts"]
            ranking[layer] = [int(e) for e in experts]
        except (ValueError, KeyError, TypeError) as err:
            raise UsageError(f"{path} line {n} is not an expert-list line ({err})") from None
        keep[layer] = ranking[layer][:kept]
    return KeepSets.from_mapping(keep), ranking
