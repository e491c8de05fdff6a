"""Experts at decode through the gathered GEMV kernel: no host sync, no data-dependent shape.

Shape legend: T tokens, k experts routed per token, S = T*k routed pairs, H hidden, N_up the up
projection's rows (2 I when gated), I the intermediate size.

`gemv_forward(mod, hidden, top_k_index, weights, up, down)` is the experts forward of one
transformers experts module for a decode-sized batch: every routed pair (token, expert) is one
row of the up projection's GEMV, then the module's own activation (`_apply_gate`: gated, clamped
or interleaved as the family defines it), the down projection's GEMV, the routing weight and the
sum over the k experts of each token. `up`/`down` compute ``y[s] = W[eids[s]] @ x[rows[s]]``:
`premoe.quant.kernels.moe_gemv` over quantized slots (`premoe.quant.resident`) or over the plain
``[E, N, K]`` parameters (here). Only the S routed experts' weights are read, and every shape
depends on T and k alone, so a CUDA graph can capture it.

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

from premoe.quant import kernels

IMPLEMENTATION = "premoe_gemv"
_RUNS_ON: set[str] = set()  # device types the kernel runs on, decided by `register` (not traced)

GemvFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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


def gemv_forward(
    mod: Any,
    hidden: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k]
    weights: torch.Tensor,  # [T, k]
    up: GemvFn,
    down: GemvFn,
    names: tuple[str, str],
    dtype: torch.dtype,
) -> torch.Tensor:
    """[T, H]: the experts' weighted sum for every token (see the module docstring)."""
    t, k = top_k_index.shape
    eids = top_k_index.reshape(-1)  # [S]
    pairs = torch.arange(t * k, device=hidden.device)  # [S]
    h = up(hidden, pairs // k, eids).to(dtype)  # [S, N_up]
    bias = bias_of(mod, names[0])
    if bias is not None:
        h = h + bias[eids]
    h = activate(mod, h)  # [S, I]
    h = down(h, pairs, eids).to(dtype)  # [S, H]
    bias = bias_of(mod, names[1])
    if bias is not None:
        h = h + bias[eids]
    h = h * weights.reshape(-1, 1).to(h.dtype)
    return h.view(t, k, -1).sum(dim=1).to(hidden.dtype)  # [T, H]


def _plain(weight: torch.Tensor, transposed: bool) -> GemvFn:
    """GEMV over plain `[E, N, K]` weights (`[E, K, N]` when `transposed`)."""
    n = weight.shape[2] if transposed else weight.shape[1]
    k_in = weight.shape[1] if transposed else weight.shape[2]

    def fn(x: torch.Tensor, rows: torch.Tensor, eids: torch.Tensor) -> torch.Tensor:
        return kernels.moe_gemv(x, rows, eids, weight, n=n, k=k_in, transposed=transposed)

    return fn


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
    transposed = bool(getattr(mod, "is_transposed", False))
    return gemv_forward(
        mod,
        hidden,
        rest[0],
        rest[1],
        _plain(w_up, transposed),
        _plain(w_down, transposed),
        (up_name, "down_proj"),
        hidden.dtype,
    )


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


__all__ = ["IMPLEMENTATION", "activate", "bias_of", "experts_forward", "gemv_forward", "register"]
