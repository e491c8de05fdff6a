"""Attention of one query token per row in one Triton kernel (decode steps on CUDA).

Shape legend: B rows, Hq query heads, Hk KV heads, G = Hq / Hk query heads per KV head, K KV
columns read, D head dim, P splits of the KV columns.

At a decode step transformers' ``sdpa`` attention with an additive mask and grouped KV heads
(every GQA family) repeats K and V `G` times (two copies of `G` x the cache read, per layer) and
then runs a kernel built for many queries: on an H200 that is ~8 µs per layer at batch 1, for
half a megabyte of cache. `decode_attention` reads each KV head's columns once for all of its `G`
query heads (`[G, D] x [D, K]` as one tensor-core dot) with an online softmax, in one program per
(row, KV head, split of the columns); where the columns are split (long contexts, or few rows
at batch 1), the last program of each (row, KV head) to finish merges the splits' partial sums
(`MERGE_IN_KERNEL`; a second small kernel for fp32 caches). The cache views are read through
their strides (the slot cache's `[B, Hk, K, D]` views are not contiguous), scores and sums in
fp32, probabilities rounded to the value dtype for the second dot, as flash attention does: the
result equals SDPA's to about one rounding of the dtype, not bit for bit (fp32 caches:
full-precision dots, no TF32).

`patched()` swaps transformers' ``sdpa`` attention function for the duration of a block: calls
with one query token, an additive float mask (or none), no dropout, softcap, sinks, sliding window
or position bias, and a CUDA cache (bf16, fp16, fp32) go to the kernel; every other call (prefill
chunks, other families' extras) goes to transformers' own function. The decode step is traced
and captured inside that block (`premoe.serve.graphs`), so the graphs replay the kernel and
nothing is patched while they run.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from premoe.quant import kernels, pdl

ENABLED = True
"""Serve's fused decode steps patch the kernel in (`ContinuousDecoder`'s `fuse`); benches turn it
off to compare with transformers' sdpa in one process."""
MAX_HEAD_DIM = 256
SPLIT_COLUMNS = 256  # KV columns a split reads at most (unless that makes over MAX_SPLITS)
PROGRAMS = 32
"""Programs a call aims for: where rows x KV heads are fewer, the columns are split further
(no split under `MIN_SPLIT_COLUMNS` columns), so that a context at a small batch is read by more
than a handful of SMs. 0: splits by `SPLIT_COLUMNS` alone. H100, bench model (4 KV heads),
`bench_attention.py`: at batch 1, 513 / 1024 columns 6.9 / 7.9 µs a call against 8.2 / 9.6 with
0; 161-256 columns and batch 4-64 within 0.5 µs either way (bench/RESULTS.md)."""
MIN_SPLIT_COLUMNS = 32
_DOT_MIN = 16  # tl.dot's smallest tile dimension (query group, head dim, block columns)
BLOCK_COLUMNS = 64  # KV columns a program reads per loop iteration (but see WIDE_COLUMNS)
WIDE_COLUMNS = 256
"""A split of a 16-bit cache with head dim <= 128 is read in one block of up to this many
columns and 8 warps, every load in flight at once (no spills: tests/serve/sm90_compile_check.py);
0: always `BLOCK_COLUMNS` (benches compare the two in one process)."""
MAX_SPLITS = 64
MERGE_IN_KERNEL = True
"""Split calls over a 16-bit cache merge their partial sums in the attention kernel itself: the
last program of each (row, KV head) to finish (an atomic ticket) merges them, so a split call is
one kernel, not two. False, and for fp32 caches: the separate merge kernel (benches compare the
two in one process)."""
_TICKETS = 1 << 16  # (row, KV head) pairs the counters cover; calls with more use the kernel
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_OP: Any = None
# keyword arguments that do not change what attention computes (flags are bools; any other
# keyword with a value, e.g. softcap, sinks, sliding_window, position_bias, goes to sdpa)
_IGNORED = frozenset({"position_ids", "cache_position"})


@functools.lru_cache(maxsize=1)
def _kernels() -> tuple[Any, Any]:
    from premoe.serve import _attention_triton as t  # imports triton

    return t.decode_attention_kernel, t.merge_splits_kernel


def _blocks(n_kv: int, block_d: int, itemsize: int, heads: int = 1) -> tuple[int, int, int]:
    """(splits, columns per split, columns per block) for `n_kv` KV columns read by `heads`
    (row, KV head) pairs: splits of at most `SPLIT_COLUMNS` columns. A 16-bit cache with head
    dim <= 128 is split further where `heads` is under `PROGRAMS`, and each split is one block
    of up to `WIDE_COLUMNS` (a whole short context in one load); other caches are read in
    blocks of `BLOCK_COLUMNS` (wider fp32 or D > 128 tiles, and fp32 tiles of one block, spill)."""
    wide = bool(WIDE_COLUMNS) and itemsize <= 2 and block_d <= 128
    splits = max(-(-n_kv // SPLIT_COLUMNS), -(-PROGRAMS // heads) if wide else 1)
    splits = max(1, min(splits, MAX_SPLITS, -(-n_kv // MIN_SPLIT_COLUMNS)))
    per = -(-n_kv // splits)
    block = min(WIDE_COLUMNS, max(_DOT_MIN, 1 << (per - 1).bit_length())) if wide else BLOCK_COLUMNS
    per = -(-per // block) * block
    return -(-n_kv // per), per, block


def _warps(block_d: int, block_n: int) -> int:
    """Warps of the attention kernel: 8 for head dims above 128 (4 spill registers there) or
    blocks wider than `BLOCK_COLUMNS`."""
    return 8 if block_d > 128 or block_n > BLOCK_COLUMNS else 4


def launch(
    q: torch.Tensor,  # [B, Hq, 1, D]
    k: torch.Tensor,  # [B, Hk, K, D]
    v: torch.Tensor,  # [B, Hk, K, D]
    mask: torch.Tensor | None,  # [B or 1, 1, 1, K] additive
    scale: float,
    out: torch.Tensor,  # [B, 1, Hq, D]
) -> None:
    """Write softmax(q k^T * scale + mask) v of every row and query head into `out`."""
    import triton

    attend, merge = _kernels()
    b, hq, _, d = q.shape
    hk, n_kv = k.shape[1], k.shape[2]
    g = hq // hk
    block_g = max(_DOT_MIN, triton.next_power_of_2(g))
    block_d = max(_DOT_MIN, triton.next_power_of_2(d))
    splits, per, block_n = _blocks(n_kv, block_d, q.element_size(), b * hk)
    if mask is not None:
        m = mask.reshape(mask.shape[0], n_kv)  # [B or 1, K]
        sm_b, sm_n = (m.stride(0) if m.shape[0] > 1 else 0), m.stride(1)
    else:
        m, sm_b, sm_n = q, 0, 0  # a pointer the kernel never reads
    # fp32 tiles with the merge inlined spill registers (sm_90): those keep the merge kernel
    wanted = MERGE_IN_KERNEL and splits > 1 and q.element_size() <= 2 and b * hk <= _TICKETS
    tickets = _tickets(q.device) if wanted else None
    part = stat = q  # never read unless split
    if splits > 1:
        part = torch.empty((b * hk * splits, block_g, block_d), dtype=torch.float32,
                           device=q.device)  # fmt: skip
        stat = torch.empty((b * hk * splits, 2, block_g), dtype=torch.float32, device=q.device)
    merged = tickets is not None
    attend[(b * hk, splits)](
        q, k, v, m, out, part, stat, q if tickets is None else tickets,
        n_kv, hk, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sm_b, sm_n, out.stride(0), out.stride(2),
        G=g, BLOCK_G=block_g, D=d, BLOCK_D=block_d, BLOCK_N=block_n, SPLIT_LEN=per,
        HAS_MASK=mask is not None, SPLIT=splits > 1,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", MERGE=merged,
        N_SPLITS=splits if merged else 1,
        num_warps=_warps(block_d, block_n), num_stages=2, **pdl.launch_args(q.device),
    )  # fmt: skip
    if splits > 1 and not merged:
        merge[(b * hk,)](
            part, stat, out, hk, out.stride(0), out.stride(2),
            N_SPLITS=splits, G=g, BLOCK_G=block_g, D=d, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip


_ticket_buffers: dict[torch.device, torch.Tensor] = {}


def _tickets(device: torch.device) -> torch.Tensor | None:
    """The device's split-merge counters `[_TICKETS]` int32, all 0 between calls (the merging
    program resets its own). Made on first use outside a CUDA graph capture (`prepare` does it
    before any trace); None where none exists yet and a capture is running. One set per device:
    two steps on one device must not run their attention at the same time (one decoder per
    device, its steps in one stream)."""
    if device.type == "cuda" and device.index is None:  # "cuda": the current device's
        device = torch.device("cuda", torch.cuda.current_device())
    buf = _ticket_buffers.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _ticket_buffers[device] = torch.zeros(_TICKETS, dtype=torch.int32, device=device)
    return buf


def _register_op() -> Any:
    @torch.library.custom_op("premoe::decode_attention", mutates_args=())
    def decode_attention_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        b, hq, _, d = q.shape
        out = torch.empty((b, 1, hq, d), dtype=q.dtype, device=q.device)
        launch(q, k, v, mask, scale, out)
        return out

    @decode_attention_op.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, scale: float) -> Any:
        b, hq, _, d = q.shape
        return q.new_empty((b, 1, hq, d))

    return decode_attention_op


def prepare(device: torch.device) -> bool:
    """Build the kernels and the custom op ahead of any trace; True if they run on `device`."""
    global _OP
    if device.type != "cuda" or not kernels.available(device):
        return False
    if _OP is None:
        _kernels()
        try:
            _OP = _register_op()
        except Exception:  # a torch without custom ops: keep transformers' attention
            _OP = False
    if _OP:  # the merge counters exist before any capture
        _tickets(device)
    return bool(_OP)


def decode_attention(
    q: torch.Tensor,  # [B, Hq, 1, D]
    k: torch.Tensor,  # [B, Hk, K, D]
    v: torch.Tensor,  # [B, Hk, K, D]
    mask: torch.Tensor | None = None,  # [B or 1, 1, 1, K] additive
    scale: float | None = None,
) -> torch.Tensor:
    """[B, 1, Hq, D]: each row's one-query attention (module docstring; CUDA)."""
    s = _scale(q, scale)
    if prepare(q.device):
        return _OP(q, k, v, mask, s)
    out = torch.empty((q.shape[0], 1, q.shape[1], q.shape[3]), dtype=q.dtype, device=q.device)
    launch(q, k, v, mask, s, out)  # the interpreter's CPU tensors (tests)
    return out


def handles(q: Any, k: Any, v: Any, mask: Any, dropout: float, kwargs: dict[str, Any]) -> bool:
    """True when `decode_attention` computes what transformers' sdpa function would."""
    for key, val in kwargs.items():
        if val is not None and not isinstance(val, bool) and key not in _IGNORED:
            return False  # softcap, sinks (s_aux), sliding_window, position_bias, ...
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or dropout:
        return False
    if q.dim() != 4 or k.dim() != 4 or q.shape[2] != 1 or q.dtype not in _DTYPES:
        return False
    b, hq, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or hq % k.shape[1]:
        return False
    if d > MAX_HEAD_DIM or k.dtype != q.dtype or v.dtype != q.dtype or not q.is_cuda:
        return False
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        return False
    if mask is None:
        return True
    return (
        isinstance(mask, torch.Tensor)
        and mask.is_floating_point()
        and mask.dim() == 4
        and mask.shape[1:3] == (1, 1)
        and mask.shape[0] in (1, b)
        and mask.shape[3] == k.shape[2]
    )


def _sdpa() -> tuple[Any, Any]:
    from transformers.modeling_utils import AttentionInterface

    return AttentionInterface, AttentionInterface._global_mapping["sdpa"]


@functools.lru_cache(maxsize=1)
def _attention() -> Any:
    """transformers' sdpa function with one-query calls through the kernel (one function for
    the process: compiled steps guard on it)."""
    _, original = _sdpa()

    def attention(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if handles(query, key, value, attention_mask, dropout, kwargs):
            return _OP(query, key, value, attention_mask, _scale(query, scaling)), None
        return original(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    return attention


def _scale(q: torch.Tensor, scaling: float | None) -> float:
    return q.shape[-1] ** -0.5 if scaling is None else float(scaling)


@contextmanager
def patched(device: torch.device) -> Iterator[None]:
    """During the block, one-query sdpa calls run `decode_attention` (module docstring)."""
    if not prepare(device):
        yield
        return
    interface, current = _sdpa()
    ours = _attention()
    if current is ours:
        yield
        return
    interface._global_mapping["sdpa"] = ours
    try:
        yield
    finally:
        interface._global_mapping["sdpa"] = current


__all__ = ["decode_attention", "handles", "launch", "patched", "prepare"]
