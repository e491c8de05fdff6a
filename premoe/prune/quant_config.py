"""Rewrite a pruned checkpoint's `quantization_config`: entries that name specific experts.

Ignore lists (`ignore`, `modules_to_not_convert`, `ignored_layers`, GPTQ's
`modules_in_block_to_quantize`) and GPTQModel's `dynamic` overrides may name a module of one
expert (`model.layers.3.mlp.experts.17.gate_proj`). After pruning, expert 17 is renumbered or
gone: such literal entries are renumbered to the expert's new id or removed. Pattern entries
(`re:...`, regexes, wildcards) and entries that name no expert stay as they are; a pattern that
spells out an expert number cannot be rewritten safely and is kept with a warning.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_LISTS = ("ignore", "modules_to_not_convert", "ignored_layers", "modules_in_block_to_quantize")
_LITERAL = re.compile(r"^(?P<pre>.*?\blayers)\.(?P<layer>\d+)\.(?P<mid>.*?\bexperts)\.(?P<e>\d+)\b")
_PATTERN_CHARS = set("*?[]()|\\^$+{}")


def _renumber(entry: str, new_id: Callable[[int, int], int | None]) -> str | None:
    """The entry with its expert renumbered; None to drop it; unchanged if it names none."""
    if entry.startswith("re:") or _PATTERN_CHARS & set(entry.replace(".", "")):
        if re.search(r"experts\\?\.\d", entry):
            log.warning("quantization_config pattern %r names an expert id; left unchanged", entry)
        return entry
    m = _LITERAL.match(entry)
    if m is None:
        return entry
    new = new_id(int(m.group("layer")), int(m.group("e")))
    if new is None:
        return None
    return f"{entry[: m.start('e')]}{new}{entry[m.end('e') :]}"


def _rewrite_list(items: list[Any], new_id: Callable[[int, int], int | None]) -> list[Any]:
    out = []
    for item in items:
        if isinstance(item, str):
            item = _renumber(item, new_id)
            if item is None:
                continue
        elif isinstance(item, list):
            item = _rewrite_list(item, new_id)
        out.append(item)
    return out


def pruned_quant_config(
    qconfig: dict[str, Any], keep: dict[int, tuple[int, ...]], dropped_layers: list[int]
) -> dict[str, Any]:
    """`qconfig` with expert-naming entries renumbered (kept) or removed (dropped experts, or
    any expert of `dropped_layers`)."""

    def new_id(layer: int, expert: int) -> int | None:
        if layer in dropped_layers or layer not in keep:
            return None if layer in dropped_layers else expert
        ids = keep[layer]
        return ids.index(expert) if expert in ids else None

    out = copy.deepcopy(qconfig)
    for name in _LISTS:
        if isinstance(out.get(name), list):
            out[name] = _rewrite_list(out[name], new_id)
    dynamic = out.get("dynamic")
    if isinstance(dynamic, dict):
        rewritten = {}
        for pattern, value in dynamic.items():
            sign, body = (
                (pattern[:2], pattern[2:]) if pattern[:2] in ("-:", "+:") else ("", pattern)
            )
            new = _renumber(body, new_id)
            if new is not None:
                rewritten[sign + new] = value
        out["dynamic"] = rewritten
    return out
