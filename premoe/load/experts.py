"""Reading experts (and other weights) of a source checkpoint in the model's in-memory layout,
dequantizing quantized formats (`premoe.io.dense`). The one place the loader, the sequential
profiler, resident swaps and the host expert cache read expert bytes through.

Shape legend: E experts in the source, m requested, N output rows, K input columns, R rows of one
expert's slice in a fused parameter (2I for gate_up, H for down).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch

from premoe.arch.keys import KeyMap, Stored
from premoe.arch.spec import ArchSpec
from premoe.errors import CheckpointError
from premoe.io.dense import read_stored
from premoe.source import ModelSource

log = logging.getLogger(__name__)


class ExpertIO:
    """Reads experts of a source checkpoint in the model's in-memory (fused) layout.

    `pieces(layer, t, experts)` yields `(expert, row_offset, host_tensor)`: for a per-expert
    checkpoint one piece per part (`gate`, `up` at offsets 0 and I), for a fused one the expert's
    whole slice. Only the requested experts' bytes are read. Quantized experts (fp8 block,
    MXFP4, compressed-tensors, GPTQ, AWQ) are dequantized here (`premoe.io.dense`), in fp32.
    """

    def __init__(self, source: ModelSource) -> None:
        self.source = source
        self.arch: ArchSpec = source.arch
        self.keymap: KeyMap = source.keymap
        self.reader = source.reader
        self.num_experts = source.num_experts
        self.quantized = self.keymap.format.quantized

    def _memory_shape(self, stored: Stored) -> tuple[int, ...]:
        shape = stored.dense_shape
        if stored.format.quantized and self.arch.memory_transposed:
            return (*shape[:-2], shape[-1], shape[-2])  # [.., N, K] -> in-memory [.., K, N]
        return shape

    def part_rows(self, layer: int, ti: int) -> list[int]:
        """Rows of each per-expert part of expert tensor `ti` (e.g. [I, I] for gate, up)."""
        t = self.arch.experts[ti]
        return [
            self.keymap.stored(layer, ti, 0, p).dense_shape[0] for p in range(len(t.per_expert))
        ]

    def check_shape(self, layer: int, ti: int, slot_shape: Sequence[int]) -> None:
        """Raise if the checkpoint's expert slice does not fit the model's slot shape."""
        t = self.arch.experts[ti]
        if self.keymap.layout == "per_expert":
            shapes = [
                self.keymap.stored(layer, ti, 0, p).dense_shape for p in range(len(t.per_expert))
            ]
            rows = sum(s[0] for s in shapes)
            ok = all(tuple(s[1:]) == tuple(slot_shape[1:]) for s in shapes)
            got = f"parts {shapes}"
            ok = ok and rows == slot_shape[0]
        else:
            stored = self.keymap.stored(layer, ti)
            shape = self._memory_shape(stored)
            ok = tuple(shape[1:]) == tuple(slot_shape)
            got = f"{next(iter(stored.keys.values()))} {tuple(shape)}"
        if not ok:
            raise CheckpointError(
                f"layer {layer} {t.memory}: checkpoint holds {got}, the model expects one expert "
                f"as {tuple(slot_shape)}; the checkpoint does not match its config.json"
            )

    def pieces(
        self, layer: int, ti: int, experts: Sequence[int]
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        if not experts:
            return
        km, q = self.keymap, self.keymap.qconfig
        if km.layout == "per_expert":
            rows = self.part_rows(layer, ti)
            offsets = [sum(rows[:p]) for p in range(len(rows))]
            for e in experts:
                for p, off in enumerate(offsets):
                    yield e, off, read_stored(self.reader, km.stored(layer, ti, e, p), q)
            return
        stored = km.stored(layer, ti)
        rows_t = read_stored(self.reader, stored, q, rows=list(experts))  # [m, ...]
        if stored.format.quantized and self.arch.memory_transposed:
            rows_t = rows_t.transpose(-1, -2)  # [m, N, K] -> in-memory [m, K, N]
        for i, e in enumerate(experts):
            yield e, 0, rows_t[i]

    def read(
        self, layer: int, expert: int, like: Sequence[torch.Tensor], *, pin: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """One expert as host tensors shaped and typed like the slot tensors `like`."""
        out = []
        for ti, slot in enumerate(like):
            buf = torch.empty(slot.shape, dtype=slot.dtype, pin_memory=pin)
            for _, off, piece in self.pieces(layer, ti, [expert]):
                buf.narrow(0, off, piece.shape[0]).copy_(piece)
            out.append(buf)
        return tuple(out)


def read_plain(source: ModelSource, key: str) -> torch.Tensor:
    """A non-MoE checkpoint tensor as the model holds it (dequantized when it is the data key of
    a quantized linear; see `KeyMap.plain_target`)."""
    _, stored = source.keymap.plain_target(key)
    if stored is None:
        return source.reader.get(key)
    return read_stored(source.reader, stored, source.keymap.qconfig)


def notice_dequantized(source: ModelSource, device: torch.device, dtype: torch.dtype) -> None:
    """One notice when a quantized checkpoint's weights become dense in memory."""
    fmt = source.keymap.format
    if fmt.quantized:
        log.warning(
            "%s weights of %s are dequantized to %s at load (resident bytes are dense bytes; "
            "on %s experts cannot stay quantized yet)",
            fmt.name,
            source.path.name,
            str(dtype).removeprefix("torch."),
            device.type,
        )
