"""The continuous decoder's decode step as CUDA graphs: one replay per step, no per-kernel launches.

Shape legend: N slots, B rows of a captured step (a bucket: 1, 2, 4, ... N), K KV columns the
step reads (a bucket: 256, 512, ... and the whole window L + 1), L MoE layers, U resident expert
slots, V vocabulary.

A decode step feeds one token per row of slots 0..B-1. Everything it reads lives in buffers
allocated once: token ids, positions and KV columns `[N, 1]`, and with per-row routing the row
masks `[N, L, U]` and pattern indices `[N]` (rowmask.py). The attention mask is computed inside the
graph from the positions (key j is visible to row b iff j <= pos[b]), so a step's host work is one
small host-to-device copy and a replay. With `compile`, the decoder `layers` run
`torch.compile`d inside the step (inductor, no CUDA graphs of its own): it fuses the hundreds of
small elementwise kernels per step (norms, rotary embeddings, casts) that otherwise dominate a
batch-1 step. Compiling per layer, not the whole step, is what keeps warm-up short (`Regions`).
A graph is captured per (B, K) on first use, after two warm-up runs (inductor and Triton compile,
cuBLAS picks its kernels) that write only the scratch KV column of every row, never a running
request's cache (and buffers named `keep`, the decoder's samples, get their values back). All graphs
share one memory pool; every tensor a graph reads that it does not compute itself is one of the
persistent buffers above, the KV cache or the weights. `patched` is entered around each traced
and captured step, outside `torch.compile` (functions the step calls, swapped in: the routers'
one-kernel top-k, premoe.serve.topk; the per-row routing hook, rowmask.py).

Exact as the eager step: the extra KV columns K - kv_len are masked (-inf before the softmax), the
idle rows (slots without a decoding request, and the bucket's padding rows) write to scratch and
see column 0 only. Expert swaps write into the same weight tensors (DESIGN.md invariant 5), so
graphs stay valid across swaps. A dropped-mass meter (`meter`, premoe.serve.miss) is captured with
the step: the router inputs are copied into its buffer, measured and folded into the rows' sums
right after the step, inside the same graph (no kernel launched per step for it).
Anything data-dependent on the host (transformers' eager experts
loop syncs on `nonzero`) cannot be captured: the engine selects the ``premoe_gemv`` experts
implementation (`premoe.quant.gemv_experts`) or quantized slots, whose decode path is sync-free.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol

import torch
import torch._inductor.config as inductor_config

from premoe.serve.rowmask import Rows

log = logging.getLogger(__name__)

# (ids [B, 1], fed [B, 1], positions [B, 1], mask [B, 1, 1, K], per-row routing | None)
#   -> logits [B, V]; `fed` 1: the row's token is the one the previous step sampled (on the device)
StepFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "Rows | None"], torch.Tensor
]


class CapturedMeter(Protocol):
    """A meter measured inside the captured step (premoe.serve.miss.SlotMiss)."""

    def tapping(self) -> AbstractContextManager[None]:
        """Entered around the warm-up and capture runs of a step."""
        ...

    def captured(self, b: int, *, warm: bool) -> None:
        """Runs right after the step of rows 0..b-1 (`warm`: a warm-up run, which executes: it
        must change no running row's state; else the capture, recorded into the graph)."""
        ...


class Regions:
    """The decoder layers' forwards, `torch.compile`d once for all layers (regional compilation).

    Every layer runs the same code, so dynamo keeps one cache for them: the layer index
    (`layer_idx`, an int on the module) is traced as a symbolic int
    (``allow_unspec_int_on_nn_module``), the KV cache is indexed by it (kvcache.py), and a shape
    that changes (batch rows, KV columns) becomes symbolic on its first change (automatic
    dynamic shapes). A warm-up over every (B, K) bucket then compiles a handful of one-layer
    graphs instead of the whole step per bucket: compiling the 24-layer step whole took 35-70 s
    per bucket on an H200 (over 8 minutes for the buckets of 256 slots). The loss: the residual
    add ending a layer and the next layer's norm are two kernels, not one.
    """

    RECOMPILE_LIMIT = 64  # compiled variants kept per layer forward (shape ranges, guards)
    COMBO_KERNELS = True
    """Inductor's combo kernels in the one-row decode step: independent small kernels of a
    layer (the query's and the key's norm and rotary embedding) launched as one. H100, bench
    model, through the server: batch 1 540.2 against 534.8 tokens/s (1.010x, three runs each,
    alternated); in every step they cost batch 64 0.85x (5967.5 against 7030.3 tokens/s), so
    steps of several rows compile without them (bench/RESULTS.md)."""

    def __init__(self, layers: Sequence[torch.nn.Module], backend: Any = "inductor") -> None:
        self.layers = list(layers)
        # the forward each layer has now (bound method, or a wrapper an offload hook installed)
        self._own = [layer.__dict__.get("forward") for layer in self.layers]
        self._compiled = [
            torch.compile(layer.forward, backend=backend, dynamic=None) for layer in self.layers
        ]

    @contextmanager
    def active(self, one_row: bool = False) -> Iterator[None]:
        """Within the block, the layers run their compiled forwards (`one_row`: a decode step of
        one row, compiled with `COMBO_KERNELS`; dynamo gives size-1 batches graphs of their
        own)."""
        config = torch._dynamo.config.patch(
            allow_unspec_int_on_nn_module=True,
            recompile_limit=self.RECOMPILE_LIMIT,
            accumulated_recompile_limit=256,  # over all code objects
        )
        # patched only when on: a prefill forward enters this block every step
        on = one_row and self.COMBO_KERNELS
        combo = inductor_config.patch(combo_kernels=True) if on else nullcontext()
        with config, combo:
            for layer, fn in zip(self.layers, self._compiled, strict=True):
                layer.forward = fn
            try:
                yield
            finally:
                for layer, own in zip(self.layers, self._own, strict=True):
                    if own is None:
                        del layer.forward
                    else:
                        layer.forward = own


def buckets_up_to(n: int, first: int = 1) -> list[int]:
    """first, 2 first, 4 first, ... below n, then n."""
    out, b = [], first
    while b < n:
        out.append(b)
        b *= 2
    return [*out, n]


class DecodeGraphs:
    """Captured decode steps of one `ContinuousDecoder` (see the module docstring)."""

    def __init__(
        self,
        step: StepFn,
        plan: Callable[[torch.Tensor, int], None],
        *,
        slots: int,
        max_len: int,
        pad_id: int,
        scratch: int,
        dtype: torch.dtype,
        device: torch.device,
        row_mask_shape: tuple[int, int] | None = None,
        first_kv_bucket: int = 256,
        compile_layers: Sequence[torch.nn.Module] = (),
        patched: Callable[[], AbstractContextManager[None]] = nullcontext,
        keep: Sequence[torch.Tensor] = (),
    ) -> None:
        self.step = step
        self.keep = list(keep)  # buffers the step writes that a capture's warm-up must not change
        # inductor fuses the small kernels of every layer; the graphs below remove the launches
        self.regions = Regions(compile_layers) if compile_layers else None
        self.plan = plan  # plan(cols [B, 1], kv_len): the cache's columns for the next forward
        self.patched = patched  # entered around every traced step, outside torch.compile
        self.device = device
        self.dtype = dtype
        self.pad_id = pad_id
        self.scratch = scratch
        self.batch_buckets = buckets_up_to(slots)
        self.kv_buckets = buckets_up_to(max_len + 1, min(first_kv_bucket, max_len + 1))
        # ids, positions, KV columns and fed flags in one buffer, so a step uploads them in one
        # copy; rows padded to an even count keep every view 16-byte aligned (inductor's guard)
        self.inputs = torch.empty((4, slots + slots % 2, 1), dtype=torch.long, device=device)
        self.ids, self.pos, self.cols, self.fed = (t[:slots] for t in self.inputs)  # [N, 1] each
        self.rows = (
            None
            if row_mask_shape is None
            else Rows(
                torch.zeros((slots, *row_mask_shape), device=device),  # [N, L, U] masks
                torch.zeros(slots, dtype=torch.long, device=device),  # [N] pattern index
            )
        )
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0
        # measured inside every captured step (SlotMiss); set before capturing
        self.meter: CapturedMeter | None = None
        self._staged_rows: Rows | None = None  # the `run` rows the row buffers hold

    @property
    def compiled(self) -> bool:
        return self.regions is not None

    def disable_compile(self) -> None:
        """Drop the compiled layers and every graph captured with them (a compile failure)."""
        self.regions = None
        self.graphs.clear()

    @staticmethod
    def bucket(buckets: Sequence[int], n: int) -> int:
        return next(b for b in buckets if b >= n)

    def _body(self, b: int, kv: int) -> torch.Tensor:
        keys = torch.arange(kv, device=self.device)  # [K]
        pos = self.pos[:b]  # [B, 1]
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        mask = torch.where(keys[None, :] <= pos, zero, torch.finfo(self.dtype).min)  # [B, K]
        self.plan(self.cols[:b], kv)
        rows = None if self.rows is None else Rows(self.rows.masks[:b], self.rows.index[:b])
        regions = self.regions.active(b == 1) if self.regions is not None else nullcontext()
        with self.patched(), regions:
            return self.step(self.ids[:b], self.fed[:b], pos, mask[:, None, None, :], rows)

    def _idle(self) -> None:
        """Every row: the padding token at position 0, written to scratch."""
        self.inputs.copy_(self._idle_inputs()[:, :, None])
        self._staged_rows = None
        if self.rows is not None:
            self.rows.masks.zero_()
            self.rows.index.zero_()

    def _idle_inputs(self) -> torch.Tensor:
        """[4, N] host copy of `inputs` with every slot idle: padding token, position 0, scratch,
        not fed (pinned on CUDA, so that `run` uploads it without waiting)."""
        pin = self.device.type == "cuda"
        out = torch.empty((4, self.inputs.shape[1]), dtype=torch.long, pin_memory=pin)
        out[0], out[1], out[2], out[3] = self.pad_id, 0, self.scratch, 0
        return out

    def _capture(self, b: int, kv: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        t0 = time.perf_counter()
        kept = [t.clone() for t in self.keep]  # e.g. the samples of a step in flight
        self._idle()
        graph, out = self._record(b, kv)
        for t, old in zip(self.keep, kept, strict=True):
            t.copy_(old)
        seconds = time.perf_counter() - t0
        self.capture_seconds += seconds
        log.info("captured the decode step of %d rows x %d KV columns in %.1f s", b, kv, seconds)
        return graph, out

    def _record(self, b: int, kv: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The step of `b` rows x `kv` columns over the buffers, warmed up on a side stream, then
        captured: the graph and its output [B, V]."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        meter = self.meter
        with meter.tapping() if meter is not None else nullcontext():
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._body(b, kv)
                    if meter is not None:
                        meter.captured(b, warm=True)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._body(b, kv)
                if meter is not None:
                    meter.captured(b, warm=False)
        torch.cuda.synchronize(self.device)
        return graph, out

    def warmup(self, batch: Sequence[int] | None = None, kv: Sequence[int] | None = None) -> float:
        """Capture the (batch, KV) buckets given (default: all); the seconds it took."""
        t0 = time.perf_counter()
        for b in batch or self.batch_buckets:
            for k in kv or self.kv_buckets:
                key = (self.bucket(self.batch_buckets, b), self.bucket(self.kv_buckets, k))
                if key not in self.graphs:
                    self.graphs[key] = self._capture(*key)
        return time.perf_counter() - t0

    def run(
        self,
        ids: torch.Tensor,  # [n, 1] host
        pos: torch.Tensor,  # [n, 1] host
        cols: torch.Tensor,  # [n, 1] host
        kv_len: int,
        rows: Rows | None = None,  # masks [n, L, U], pattern index [n] (device)
        fed: torch.Tensor | None = None,  # [n, 1] host: 1 where the token is the last sample
    ) -> torch.Tensor:
        """Logits [n, V] of one decode step over slots 0..n-1 (a view of the graph's output)."""
        n = ids.shape[0]
        key = (self.bucket(self.batch_buckets, n), self.bucket(self.kv_buckets, kv_len))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(*key)
        b = key[0]
        # a fresh pinned buffer (the caching host allocator keeps it until its copy has run):
        # with a step in flight, the last step's copy may not have run yet. One copy, straight
        # into the graph's inputs: every eager op between two replays is device time a step
        host = self._idle_inputs()  # [4, N] ids, pos, cols, fed
        host[0, :n], host[1, :n], host[2, :n] = ids[:, 0], pos[:, 0], cols[:, 0]
        if fed is not None:
            host[3, :n] = fed[:, 0]
        self.inputs.copy_(host[:, :, None], non_blocking=True)
        # the same rows as the last step (`RowRouting.rows` returns them again): already there
        if self.rows is not None and rows is not None and rows is not self._staged_rows:
            self.rows.masks[:n].copy_(rows.masks)
            self.rows.masks[n:b].zero_()
            self.rows.index[:n].copy_(rows.index)
            self.rows.index[n:b].zero_()
            self._staged_rows = rows
        graph, out = entry
        graph.replay()
        return out[:n]
