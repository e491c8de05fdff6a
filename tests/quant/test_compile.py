"""The quantized experts' kernel path traces into one graph (no graph break), and a swap after
compilation is seen by the compiled graph (DESIGN.md invariant 5).

The Triton kernel exists only on the GPU machine, so `kernels.moe_gemv` (and its fused variants
`moe_gemv_silu` / `moe_gemv_wsum`) are replaced here by reference custom ops with the same
signatures (dequantize + matmul); what is checked is premoe's own forward code around them.
"""

from __future__ import annotations

import pytest
import torch

from premoe.quant import kernels
from premoe.quant.codecs import dequantize
from premoe.quant.resident import quantize_resident
from tests.tiny import build_tiny


@torch.library.custom_op("premoe_test::gemv_ref", mutates_args=())
def _gemv_ref(
    x: torch.Tensor,
    rows: torch.Tensor,
    experts: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    n: int,
    k: int,
    bn: int,
    bk: int,
    int4: bool,
) -> torch.Tensor:
    if int4:
        parts = {"weight_packed": weight, "weight_scale": scale,
                 "weight_shape": torch.tensor([n, k])}  # fmt: skip
        args = {"num_bits": 4, "group_size": bk}
        cfg = {"config_groups": {"g": {"targets": ["Linear"], "weights": args}}}
        w = dequantize("ct_int4_pack", parts, cfg, dtype=torch.float32)
    else:
        parts = {"weight": weight, "weight_scale_inv": scale}
        w = dequantize("fp8_block", parts, {"weight_block_size": [bn, bk]}, dtype=torch.float32)
    return torch.einsum("snk,sk->sn", w[experts], x[rows].float())  # [S, N]


@_gemv_ref.register_fake
def _(x, rows, experts, weight, scale, n, k, bn, bk, int4):  # type: ignore[no-untyped-def]
    return x.new_empty(rows.shape[0], n, dtype=torch.float32)


def _fake_moe_gemv(
    x, rows, experts, weight, scale, *, n, k, scale_block, int4, round_dtype=None, glu=None
):  # type: ignore[no-untyped-def]
    if glu is not None:  # x [R, 2 k]: the up projection's [gate | up], read as the activation
        gate, up = x.to(glu).float().chunk(2, dim=-1)
        x = (gate * torch.sigmoid(gate) * up).to(glu)
    if isinstance(rows, int):  # pairs per x row (token-major)
        rows = torch.arange(experts.numel(), device=x.device) // rows
    return torch.ops.premoe_test.gemv_ref(
        x, rows, experts, weight, scale, n, k, scale_block[0], scale_block[1], int4
    )


@torch.library.custom_op("premoe_test::gemv_silu_ref", mutates_args=())
def _gemv_silu_ref(
    x: torch.Tensor,
    experts: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    n: int,
    k: int,
    bn: int,
    bk: int,
    int4: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    rows = torch.arange(experts.numel(), device=x.device) // experts.shape[1]
    h = _gemv_ref(x, rows, experts.reshape(-1), weight, scale, 2 * n, k, bn, bk, int4)
    gate, up = h.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(out_dtype)  # [S, n]


@_gemv_silu_ref.register_fake
def _(x, experts, weight, scale, n, k, bn, bk, int4, out_dtype):  # type: ignore[no-untyped-def]
    return x.new_empty(experts.numel(), n, dtype=out_dtype)


@torch.library.custom_op("premoe_test::gemv_wsum_ref", mutates_args=())
def _gemv_wsum_ref(
    x: torch.Tensor,
    experts: torch.Tensor,
    route_w: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    n: int,
    k: int,
    bn: int,
    bk: int,
    int4: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    rows = torch.arange(experts.numel(), device=x.device)
    y = _gemv_ref(x, rows, experts.reshape(-1), weight, scale, n, k, bn, bk, int4)  # [S, n]
    y = y.view(*experts.shape, n) * route_w.float().unsqueeze(-1)
    return y.sum(dim=1).to(out_dtype)  # [T, n]


@_gemv_wsum_ref.register_fake
def _(x, experts, route_w, weight, scale, n, k, bn, bk, int4, out_dtype):  # type: ignore[no-untyped-def]
    return x.new_empty(experts.shape[0], n, dtype=out_dtype)


def _fake_silu(x, experts, weight, scale, *, n, k, out_dtype, scale_block, int4, round_dtype=None):  # type: ignore[no-untyped-def]
    return torch.ops.premoe_test.gemv_silu_ref(
        x, experts, weight, scale, n, k, scale_block[0], scale_block[1], int4, out_dtype
    )


def _fake_wsum(
    x, experts, route_w, weight, scale, *, n, k, out_dtype, scale_block, int4, round_dtype=None
):  # type: ignore[no-untyped-def]
    return torch.ops.premoe_test.gemv_wsum_ref(
        x, experts, route_w, weight, scale, n, k, scale_block[0], scale_block[1], int4, out_dtype
    )


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("scheme", ["fp8", pytest.param("int4", marks=pytest.mark.slow)])
def test_kernel_path_compiles_fullgraph_and_sees_swaps(
    scheme: str, fuse: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "moe_gemv", _fake_moe_gemv)
    monkeypatch.setattr(kernels, "moe_gemv_silu", _fake_silu)
    monkeypatch.setattr(kernels, "moe_gemv_wsum", _fake_wsum)
    m = build_tiny("qwen3_moe", 0, hidden_size=64, moe_intermediate_size=32, vocab_size=128)
    m = m.eval()
    paths = [n for n, mod in m.named_modules() if n.endswith("mlp.experts")]
    opt = {"block": (16, 16)} if scheme == "fp8" else {"group_size": 16}
    qr = quantize_resident(m, paths, scheme, **opt)
    for q in qr.layers.values():
        q.use_kernel = True  # as on CUDA
        q.fuse = fuse  # the two fused kernels (qwen3_moe: SiLU gate) or the unfused path
    x = torch.randint(0, 100, (1, 1), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        ref = m(x, use_cache=False).logits
        assert torch.equal(compiled(x, use_cache=False).logits, ref)
        # swap: every slot takes its neighbour's expert, in place
        for q in qr.layers.values():
            entries = [q.read_slot(s) for s in range(q.num_experts)]
            for s in range(q.num_experts):
                q.write_slot(s, entries[(s + 1) % q.num_experts])
        after = m(x, use_cache=False).logits
        assert not torch.equal(after, ref)
        assert torch.equal(compiled(x, use_cache=False).logits, after)
    torch._dynamo.reset()
