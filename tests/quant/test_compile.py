"""The quantized experts' kernel path traces into one graph (no graph break), and a swap after
compilation is seen by the compiled graph (DESIGN.md invariant 5).

The Triton kernel exists only on the GPU machine, so `kernels.moe_gemv` is replaced here by a
reference custom op with the same signature (dequantize + matmul); what is checked is premoe's own
forward code around it.
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


def _fake_moe_gemv(x, rows, experts, weight, scale, *, n, k, scale_block, int4, round_dtype=None):  # type: ignore[no-untyped-def]  # noqa: E501
    return torch.ops.premoe_test.gemv_ref(
        x, rows, experts, weight, scale, n, k, scale_block[0], scale_block[1], int4
    )


@pytest.mark.parametrize("scheme", ["fp8", pytest.param("int4", marks=pytest.mark.slow)])
def test_kernel_path_compiles_fullgraph_and_sees_swaps(
    scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "moe_gemv", _fake_moe_gemv)
    m = build_tiny("qwen3_moe", 0, hidden_size=64, moe_intermediate_size=32, vocab_size=128)
    m = m.eval()
    paths = [n for n, mod in m.named_modules() if n.endswith("mlp.experts")]
    opt = {"block": (16, 16)} if scheme == "fp8" else {"group_size": 16}
    qr = quantize_resident(m, paths, scheme, **opt)
    for q in qr.layers.values():
        q.use_kernel = True  # as on CUDA
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
