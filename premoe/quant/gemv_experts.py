"""Experts at decode through the gathered GEMV kernel: no host sync, no data-dependent shape.

Shape legend: T tokens, k experts routed per token, S = T*k routed pairs, H hidden, N_up the up
projection's rows (2 I when gated), I the intermediate size.

`gemv_forward(mod, hidden, top_k_index, weights, up, down)` is the experts forward of one
transformers experts module for a decode-sized batch: every routed pair (token, expert) is one
row of the up projection's GEMV, then the module's own activation (`_apply_gate`: gated, clamped
or interleaved as the family defines it; a SiLU-gated one is read by the down projection's GEMV
as it loads its row, `GLU_ON_LOAD`), the down projection's GEMV, the routing weight and the sum
over the k experts of each token. `up`/`down` compute ``y[s] = W[eids[s]] @ x[s // r]``
(r = k for the up projection, 1 for the down; no row-index tensor is computed):
`premoe.quant.kernels.moe_gemv` over quantized slots (`premoe.quant.resident`) or over the plain
``[E, N, K]`` parameters (here). Only the S routed experts' weights are read, and every shape
depends on T and k alone, so a CUDA graph can capture it.

Where the module is a SiLU-gated experts module with transformers' default gate and no biases
(`silu_gated`: Qwen, Mixtral, DeepSeek, OLMoE...; not gpt-oss's clamped interleaved gate) and
the caller passes `fused` kernels, the same forward is two kernels instead of about six:
`kernels.moe_gemv_silu` (up projection and ``silu(gate) * up``) and `kernels.moe_gemv_wsum`
(down projection, routing weight and sum over k), each rounding once to the output dtype.

`register()` adds the experts implementation ``premoe_gemv`` to transformers' registry
(`transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`, chosen by
``config._experts_implementation`` like ``grouped_mm``): plain weights through the kernel when
S <= the module's expert count (decode: a pair reads at most what a grouped matmul would) and
the kernel runs on the device, else ``grouped_mm`` (CUDA, bf16; ``batched_mm`` in other dtypes)
or transformers' eager loop (CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.activations import SiLUActivation

from premoe.quant import kernels

try:  # the gate `use_experts_implementation` installs on classes without their own
    from transformers.integrations.moe import _default_apply_gate as _DEFAULT_GATE
except ImportError:  # pragma: no cover - a transformers without it: every gate is its own
    _DEFAULT_GATE = None

IMPLEMENTATION = "premoe_gemv"
_RUNS_ON: set[str] = set()  # device types the kernel runs on, decided by `register` (not traced)

# (x [R, K], rows: pairs per x row (pair s reads row s // rows) | [S] row of each pair,
#  eids [S], glu: None, or x [R, 2 K] is the up projection's output and the product reads
#  silu(gate) * up in this dtype, `kernels.moe_gemv`) -> [S, N] fp32
GemvFn = Callable[[torch.Tensor, "torch.Tensor | int", torch.Tensor, "torch.dtype | None"],
                  torch.Tensor]  # fmt: skip
# fused: (hidden [T, H], top_k_index [T, k], dtype) -> silu(gate) * up [S, I] in dtype
UpActFn = Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]
# fused: (h [S, I], top_k_index [T, k], weights [T, k], dtype) -> [T, H] in dtype
DownSumFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]
_SILU = (SiLUActivation, torch.nn.SiLU)


def bias_of(mod: Any, name: str) -> torch.Tensor | None:
    """The `name`_bias parameter of an experts module that has biases, else None."""
    if not getattr(mod, "has_bias", False):
        return None
    b = getattr(mod, f"{name}_bias", None)
    return b if isinstance(b, torch.Tensor) else None


def activate(mod: Any, h: torch.Tensor) -> torch.Tensor:
    """The module's activation of the up projection's output `h` [S, N_up] -> [S, I]."""
    if getattr(mod, "has_gate", True):
        gate_fn = getattr(mod, "_apply_gate", None)
        if gate_fn is not None:
            return gate_fn(h)
        gate, up = h.chunk(2, dim=-1)
        return mod.act_fn(gate) * up
    return mod.act_fn(h)


def silu_gated(mod: Any, names: tuple[str, str]) -> bool:
    """True when `activate` is ``silu(gate) * up`` of the concatenated ``[gate; up]`` rows and the
    projections `names` have no bias: what `kernels.moe_gemv_silu` / `moe_gemv_wsum` compute.
    Only classes of transformers' experts interface keeping its default gate qualify."""
    return bool(
        getattr(mod, "has_gate", True)
        and getattr(mod, "is_concatenated", True)
        and not getattr(mod, "has_post_expert_norm", False)
        and _DEFAULT_GATE is not None
        and getattr(type(mod), "_apply_gate", None) is _DEFAULT_GATE
        and type(getattr(mod, "act_fn", None)) in _SILU
        and bias_of(mod, names[0]) is None
        and bias_of(mod, names[1]) is None
    )


def gemv_forward(
    mod: Any,
    hidden: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k]
    weights: torch.Tensor,  # [T, k]
    up: GemvFn,
    down: GemvFn,
    names: tuple[str, str],
    dtype: torch.dtype,
    fused: tuple[UpActFn, DownSumFn] | None = None,
) -> torch.Tensor:
    """[T, H]: the experts' weighted sum for every token (see the module docstring); through
    the two `fused` kernels where given and `silu_gated` says they compute the module's forward.
    `dtype`: the activations' (the up projection's output)."""
    if fused is not None and silu_gated(mod, names):
        h = fused[0](hidden, top_k_index, dtype)  # [S, I]
        return fused[1](h, top_k_index, weights, hidden.dtype)  # [T, H]
    t, k = top_k_index.shape
    eids = top_k_index.reshape(-1)  # [S]
    h = up(hidden, k, eids, None)  # [S, N_up] fp32: pair s reads token s // k
    if GLU_ON_LOAD and dtype in kernels.GLU_DTYPES and silu_gated(mod, names):
        h = down(h, 1, eids, dtype).to(dtype)  # [S, H]: the activation as it reads its row
    else:
        h = h.to(dtype)
        bias = bias_of(mod, names[0])
        if bias is not None:
            h = h + bias[eids]
        h = activate(mod, h)  # [S, I]
        h = down(h, 1, eids, None).to(dtype)  # [S, H]: pair s reads its own row
    bias = bias_of(mod, names[1])
    if bias is not None:
        h = h + bias[eids]
    h = h * weights.reshape(-1, 1).to(h.dtype)
    return h.view(t, k, -1).sum(dim=1).to(hidden.dtype)  # [T, H]


def _plain(weight: torch.Tensor, transposed: bool) -> GemvFn:
    """GEMV over plain `[E, N, K]` weights (`[E, K, N]` when `transposed`)."""
    n = weight.shape[2] if transposed else weight.shape[1]
    k_in = weight.shape[1] if transposed else weight.shape[2]

    def fn(
        x: torch.Tensor, rows: torch.Tensor | int, eids: torch.Tensor, glu: torch.dtype | None
    ) -> torch.Tensor:
        return kernels.moe_gemv(x, rows, eids, weight, n=n, k=k_in, transposed=transposed, glu=glu)

    return fn


def _plain_fused(w_up: torch.Tensor, w_down: torch.Tensor) -> tuple[UpActFn, DownSumFn]:
    """The fused kernels over plain `[E, 2I, H]` / `[E, H, I]` weights."""
    i, h_size = w_down.shape[2], w_down.shape[1]

    def up_act(x: torch.Tensor, top_k_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return kernels.moe_gemv_silu(x, top_k_index, w_up, n=i, k=h_size, out_dtype=dtype)

    def down_sum(
        h: torch.Tensor, top_k_index: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        return kernels.moe_gemv_wsum(h, top_k_index, weights, w_down, n=h_size, k=i,
                                     out_dtype=dtype)  # fmt: skip

    return up_act, down_sum


GLU_ON_LOAD = True
"""Where the module is `silu_gated` and the activations are bf16 or fp32, the down projection's
GEMV reads ``silu(gate) * up`` from the up projection's fp32 output as it loads its row
(`kernels.moe_gemv`'s `glu`), rounded as the activation kernel it replaces rounded it: one kernel
less per MoE layer in a decode step."""

FUSE = False
"""Serve's decode experts through the two fused kernels where they apply (`premoe_gemv` over plain
weights, and the default of `QuantizedExperts.fuse`): the SiLU-gated up projection in one kernel,
the down projection and the weighted sum over the top-k in another. Off: in `bench_decode.py`'s
step (H100, same process) it gained 1.022x and 1.031x at batch 1 and nothing at batch 64, but in
the server (H100, same machine, `bench_serve.py --fused-experts`) a batch-1 step replayed in
2.19 ms against 2.17 unfused, and the load figures moved by -2 % to +4 % (bench/RESULTS.md)."""


def plain_gemvs(mod: Any) -> tuple[GemvFn, GemvFn, tuple[UpActFn, DownSumFn] | None]:
    """(up, down, fused) for `gemv_forward` over the module's own parameters; fused is None
    where the weights are stored transposed."""
    up_name = "gate_up_proj" if getattr(mod, "has_gate", True) else "up_proj"
    w_up, w_down = getattr(mod, up_name), mod.down_proj
    transposed = bool(getattr(mod, "is_transposed", False))
    fused = None if transposed else _plain_fused(w_up, w_down)
    return _plain(w_up, transposed), _plain(w_down, transposed), fused


def _fallback(mod: Any, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if hidden.device.type == "cuda":  # grouped_mm syncs on the host unless bf16
        impl = "grouped_mm" if hidden.dtype == torch.bfloat16 else "batched_mm"
        return ALL_EXPERTS_FUNCTIONS[impl](mod, hidden, *args, **kwargs)
    original = getattr(type(mod).forward, "__wrapped__", None)  # the class's own eager loop
    if original is None:  # pragma: no cover - every transformers experts class is wrapped
        raise RuntimeError(f"{type(mod).__name__} has no eager experts forward")
    return original(mod, hidden, *args, **kwargs)


def experts_forward(mod: Any, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The ``premoe_gemv`` experts implementation (see the module docstring)."""
    rest = [*args, *kwargs.values()]  # (top_k_index, top_k_weights), by position or keyword
    up_name = "gate_up_proj" if getattr(mod, "has_gate", True) else "up_proj"
    w_up, w_down = getattr(mod, up_name, None), getattr(mod, "down_proj", None)
    if (
        len(rest) != 2
        or not isinstance(w_up, torch.Tensor)
        or not isinstance(w_down, torch.Tensor)
        or rest[0].numel() > w_up.shape[0]
        or hidden.device.type not in _RUNS_ON
    ):
        return _fallback(mod, hidden, *args, **kwargs)
    up, down, fused = plain_gemvs(mod)
    names = (up_name, "down_proj")
    fused = fused if FUSE else None
    return gemv_forward(mod, hidden, rest[0], rest[1], up, down, names, hidden.dtype, fused)


def register() -> str:
    """Add ``premoe_gemv`` to transformers' experts implementations (idempotent); its name.

    Also builds the kernel ahead of any `torch.compile` trace and decides, once, on which device
    types it runs (CUDA; the CPU only under ``TRITON_INTERPRET=1``)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    for dev in ("cuda", "cpu"):
        if (dev == "cpu" or torch.cuda.is_available()) and kernels.prepare(torch.device(dev)):
            _RUNS_ON.add(dev)

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, experts_forward)
    return IMPLEMENTATION


__all__ = [
    "IMPLEMENTATION",
    "activate",
    "bias_of",
    "experts_forward",
    "gemv_forward",
    "plain_gemvs",
    "register",
    "silu_gated",
]
