"""Programmatic dependent launch (PDL) of premoe's decode kernels on sm_90 and later.

A kernel launched with PDL may start while the kernel before it in the stream is still running:
its programs are scheduled as the previous kernel's finish, and each waits for that kernel's
completion (`_gemv_triton.pdl_enter`) before it reads anything another kernel wrote; work that
reads nothing new (a linear layer's weights) can go first. Inside a CUDA graph this turns each
launch gap of the decode step into overlap. Every kernel that lets the next one launch early
does so only after its own wait, so whatever ran two kernels back is complete when a kernel
starts.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

ENABLED = os.environ.get("PREMOE_PDL", "1") != "0"
"""Launch the GEMV, attention and top-k kernels with PDL where the device supports it: on by
default (the H200's batch-1 step 1.03x faster, bench/RESULTS.md); `PREMOE_PDL=0` in the
environment turns it off."""


@functools.cache
def _capable(index: int) -> bool:
    """sm_90+ and a Triton with grid dependency control (`tl.extra.cuda.gdc_wait`)."""
    import triton.language as tl

    extra = getattr(getattr(tl, "extra", None), "cuda", None)
    gdc = extra is not None and hasattr(extra, "gdc_wait")
    return gdc and torch.cuda.get_device_capability(index)[0] >= 9


def active(device: torch.device) -> bool:
    """True when kernels on `device` are launched with PDL (`ENABLED`, a CUDA device of sm_90 or
    later, a Triton that has it). The kernels' `PDL` constexpr takes this value."""
    if not ENABLED or device.type != "cuda":
        return False
    return _capable(torch.cuda.current_device() if device.index is None else device.index)


def launch_options(on: bool) -> dict[str, Any]:
    """Triton launch options of a kernel launched with PDL (none otherwise: older Tritons have
    no such option)."""
    return {"launch_pdl": True} if on else {}


def launch_args(device: torch.device) -> dict[str, Any]:
    """A PDL-aware kernel's `PDL` constexpr and its launch options, decided together (a kernel
    launched with PDL that does not wait would race the kernel before it)."""
    on = active(device)
    return {"PDL": on, **launch_options(on)}


__all__ = ["ENABLED", "active", "launch_args", "launch_options"]
