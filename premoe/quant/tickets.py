"""Per-device counters for kernels whose last program to finish does a final step itself
(`premoe.serve.attention`'s split merge, `premoe.quant.router_gemv`'s top-k): an atomic
ticket per group of programs instead of a second kernel.

Every counter is 0 between launches (the program that takes the last ticket resets its own), so
one buffer per device serves every such kernel: their tickets are taken after their PDL wait,
when the kernel before has finished (`premoe.quant.pdl`), so two of them never count at the same
time as long as a device's decode steps run in one stream (one decoder per device).
"""

from __future__ import annotations

import torch

SIZE = 1 << 16  # counters per device: groups a launch may count at most
_buffers: dict[torch.device, torch.Tensor] = {}


def _key(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def tickets(device: torch.device) -> torch.Tensor | None:
    """The device's counters `[SIZE]` int32, all 0 between launches. Made on first use outside
    a CUDA graph capture (`prepare` makes them before any trace); None where none exists yet and
    a capture is running (a capture does not run the zeroing)."""
    key = _key(device)
    buf = _buffers.get(key)
    if buf is None:
        if key.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _buffers[key] = torch.zeros(SIZE, dtype=torch.int32, device=key)
    return buf


def prepare(device: torch.device) -> None:
    """Make the device's counters now, before any capture."""
    tickets(device)


__all__ = ["SIZE", "prepare", "tickets"]
