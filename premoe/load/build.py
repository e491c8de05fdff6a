"""Building a transformers model straight onto a device: the skeleton (parameters on the meta
device, buffers computed on the CPU by the modules' own `__init__`), allocating its parameters
once on the device, and pipelined host-to-device copies (`Copier`).

Used by the pruned loader, the layer-sequential profiler and resident swaps.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from premoe.errors import CheckpointError
from premoe.runtime import building_models

log = logging.getLogger(__name__)


# ---- model skeleton: parameters on meta, buffers computed on the CPU --------------------------


@contextmanager
def params_on_meta() -> Iterator[None]:
    """While active, every parameter a module registers is moved to the meta device (its CPU
    allocation is freed at once, untouched); buffers stay where `__init__` computed them."""
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            cls = type(param)
            meta = cls(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            self._parameters[name] = meta

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_skeleton(config: Any, dtype: torch.dtype, **kwargs: Any) -> Any:
    """The transformers model of `config`: parameters on meta, buffers real (CPU), tied."""
    from transformers import AutoModelForCausalLM

    with params_on_meta(), building_models():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    return model


def _fp32_patterns(model: Any, dtype: torch.dtype) -> re.Pattern[str] | None:
    """The `_keep_in_fp32_modules(_strict)` rule of `from_pretrained` as one regex (or None)."""
    get_plan = getattr(model, "_get_dtype_plan", None)
    plan: dict[str, torch.dtype] = get_plan(dtype) if get_plan is not None else {}
    if not plan:
        return None
    return re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in plan))


def materialize(
    model: Any, device: torch.device, dtype: torch.dtype, only: set[int] | None = None
) -> None:
    """Give every meta parameter real (uninitialised) storage on `device`, once per tied group,
    in the dtype `from_pretrained` would use; move buffers to `device`. With `only` (ids of
    parameter objects), the other parameters stay on the meta device."""
    fp32 = _fp32_patterns(model, dtype)
    params: dict[int, nn.Parameter] = {}
    buffers: dict[int, torch.Tensor] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in list(mod._parameters.items()):
            if p is None or (only is not None and id(p) not in only):
                continue
            if id(p) not in params:
                dt = torch.float32 if fp32 is not None and fp32.search(prefix + name) else p.dtype
                new = torch.empty(p.shape, dtype=dt, device=device)
                params[id(p)] = nn.Parameter(new, requires_grad=p.requires_grad)
            mod._parameters[name] = params[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is None:
                continue
            if id(b) not in buffers:
                dt = b.dtype
                persistent = name not in mod._non_persistent_buffers_set
                if persistent and fp32 is not None and fp32.search(prefix + name):
                    dt = torch.float32
                buffers[id(b)] = b.to(device=device, dtype=dt)
            mod._buffers[name] = buffers[id(b)]


# ---- host -> device copies ---------------------------------------------------------------------


class Copier:
    """Host-to-device copies into existing device tensors (in place).

    On CPU it is `dst.copy_(src)`. On CUDA the copies run on a side stream that first waits for
    the compute stream; a pinned source of the right dtype is copied directly (asynchronously),
    anything else is first converted into a ring of pinned staging buffers, so that the host-side
    read (page cache -> pinned) of one piece overlaps the transfer of the previous one.
    `finish()` makes the compute stream wait for the copies (and, if `blocking`, the host too).
    """

    def __init__(
        self, device: torch.device, *, chunk_bytes: int = 64 << 20, n_chunks: int = 3
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.bytes = 0
        if self.cuda:
            self.stream = torch.cuda.Stream(device=device)
            self.stream.wait_stream(torch.cuda.current_stream(device))
            self._chunk = chunk_bytes
            self._ring: list[torch.Tensor] = []
            self._events: list[torch.cuda.Event | None] = [None] * n_chunks
            self._n = n_chunks
            self._cur = -1
            self._used = chunk_bytes  # forces a new chunk on first use

    def _stage(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of pinned memory not read by any pending copy (uint8)."""
        if self._used + nbytes > self._chunk:
            if self._cur >= 0:
                ev = torch.cuda.Event()
                ev.record(self.stream)
                self._events[self._cur] = ev
            self._cur = (self._cur + 1) % self._n
            if self._cur >= len(self._ring):
                self._ring.append(torch.empty(self._chunk, dtype=torch.uint8, pin_memory=True))
            pending = self._events[self._cur]
            if pending is not None:
                pending.synchronize()
            self._used = 0
        out = self._ring[self._cur][self._used : self._used + nbytes]
        self._used += (nbytes + 511) // 512 * 512
        return out

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> int:
        """Copy host `src` into device `dst` (same shape; dtype converted). Returns bytes moved."""
        if dst.shape != src.shape:
            raise CheckpointError(
                f"tensor shape {tuple(src.shape)} does not match the model's {tuple(dst.shape)}"
            )
        nbytes = dst.numel() * dst.element_size()
        self.bytes += nbytes
        if not self.cuda:
            dst.copy_(src)
            return nbytes
        if src.device.type == "cuda" or (src.is_pinned() and src.dtype == dst.dtype):
            with torch.cuda.stream(self.stream):
                dst.copy_(src, non_blocking=True)
            return nbytes
        flat_dst = dst.view(-1) if dst.is_contiguous() else None
        if flat_dst is None:  # never the case for parameters and their slot slices
            with torch.cuda.stream(self.stream):
                dst.copy_(src.to(dst.dtype).pin_memory(), non_blocking=True)
            return nbytes
        flat_src = src.contiguous().view(-1)
        step = max(1, self._chunk // dst.element_size())
        for start in range(0, flat_dst.numel(), step):
            n = min(step, flat_dst.numel() - start)
            staged = self._stage(n * dst.element_size()).view(dst.dtype)
            staged.copy_(flat_src[start : start + n])
            with torch.cuda.stream(self.stream):
                flat_dst[start : start + n].copy_(staged, non_blocking=True)
        return nbytes

    def run(self, fn: Callable[[], Any]) -> Any:
        """Run device-side work `fn` in stream order with the copies."""
        if not self.cuda:
            return fn()
        with torch.cuda.stream(self.stream):
            return fn()

    def finish(self, *, blocking: bool = True) -> torch.cuda.Event | None:
        """Order the compute stream after the copies; returns the copies' event (CUDA)."""
        if not self.cuda:
            return None
        done = torch.cuda.Event()
        done.record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(done)
        if blocking:
            done.synchronize()
        return done
