"""Read checkpoint tensors the way the model holds them: dense, dequantized from companions.

`premoe.arch.keys.KeyMap` says how every weight is stored (`Stored`: format, component keys);
this module reads those components through a `CheckpointReader` and, for quantized formats, turns
them into the dense weight with `premoe.quant.codecs.dequantize` (computed in fp32, as
transformers does on the CPU). Used by the pruned loader, the sequential profiler, the routing
prefix and resident swaps, so every path dequantizes the same way.

Shape legend: E experts (m of them read), N output rows, K input columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from premoe.arch.keys import Stored
from premoe.io.reader import CheckpointReader
from premoe.quant.codecs import dequantize


def read_stored(
    reader: CheckpointReader,
    stored: Stored,
    qconfig: Mapping[str, Any],
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """The dense tensor `stored` encodes ([N, K], or [m, N, K] of fused experts `rows`)."""
    if not stored.format.quantized:
        (key,) = stored.keys.values()
        return reader.get(key) if rows is None else reader.get_rows(key, list(rows))
    parts = {
        comp.lstrip("_"): reader.get(key) if rows is None else reader.get_rows(key, list(rows))
        for comp, key in stored.keys.items()
    }
    return dequantize(stored.format.codec or "", parts, qconfig, dtype=torch.float32)
