"""The fused experts path (`kernels.moe_gemv_silu` + `kernels.moe_gemv_wsum`, chosen by
`gemv_experts.gemv_forward` for SiLU-gated modules) against the unfused GEMV path: which modules
qualify (CPU), and on CUDA the same outputs within bf16 rounding, eager, inside a captured CUDA
graph and under torch.compile, for bf16 weights and fp8 / int4 resident slots.

Shape legend: T tokens, k routed per token, S = T*k pairs, H hidden, I intermediate, E experts.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from premoe.quant import gemv_experts, kernels
from premoe.quant.gemv_experts import gemv_forward, plain_gemvs, silu_gated
from premoe.quant.resident import quantize_resident
from tests.helpers import GPU
from tests.tiny import build_tiny

NAMES = ("gate_up_proj", "down_proj")


def _experts(family: str, **overrides: Any) -> Any:
    m = build_tiny(family, 0, **overrides)
    return next(mod for n, mod in m.named_modules() if n.endswith("mlp.experts"))


def test_silu_gated_decides_the_fused_path() -> None:
    assert silu_gated(_experts("qwen3_moe"), NAMES)
    assert silu_gated(_experts("mixtral"), NAMES)
    assert not silu_gated(_experts("qwen3_moe", hidden_act="gelu"), NAMES)
    assert not silu_gated(_experts("gpt_oss"), NAMES)  # clamped interleaved gate, biases


# ---- CUDA ------------------------------------------------------------------------------------

E, H, I = 24, 512, 200  # noqa: E741  (I: not a multiple of any BLOCK_N, H / BLOCK_N small)
K_TOP = 8


def _module(scheme: str) -> tuple[Any, Any]:
    """(experts module, forward(hidden, idx, w, fuse)) on CUDA in bf16, `scheme` dense | fp8 |
    int4 (resident slots)."""
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                         num_experts_per_tok=K_TOP, hidden_act="silu")  # fmt: skip
    with torch.device("meta"):
        mod = Qwen3MoeExperts(cfg)
    gen = torch.Generator("cuda").manual_seed(0)
    for name, shape in (("gate_up_proj", (E, 2 * I, H)), ("down_proj", (E, H, I))):
        w = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.05
        setattr(mod, name, torch.nn.Parameter(w, requires_grad=False))
    if scheme == "dense":
        up, down, fused = plain_gemvs(mod)

        def forward(hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, fuse: bool) -> Any:
            return gemv_forward(mod, hidden, idx, w, up, down, NAMES, hidden.dtype,
                                fused if fuse else None)  # fmt: skip

        return mod, forward
    root = torch.nn.Module()
    root.experts = mod
    opt = {"block": (8, 8)} if scheme == "fp8" else {"group_size": 8}  # 8 divides I and H
    q = quantize_resident(root, ["experts"], scheme, **opt).layers["experts"]
    q.gemv_rows = 10**6

    def forward_q(hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, fuse: bool) -> Any:
        q.fuse = fuse
        return q.forward(hidden, idx, w)

    return mod, forward_q


def _routes(t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [T, H] bf16, top_k_index [T, k], weights [T, k] fp32) on CUDA; token 0 repeats
    an expert (allowed by the kernels, never by a router)."""
    gen = torch.Generator("cuda").manual_seed(seed)
    hidden = torch.randn(t, H, generator=gen, device="cuda", dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(E, generator=gen, device="cuda")[:K_TOP] for _ in range(t)])
    idx[0, 1] = idx[0, 0]
    w = torch.rand(t, K_TOP, generator=gen, device="cuda").softmax(-1)
    return hidden, idx, w


def test_launch_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each variant takes its own launch table; formats a table lacks fall back to SHAPES (the
    down projection reading the GLU has only a dense table)."""
    glu = {"dense": ((8, (4, 512, 4)), (kernels.ANY, (64, 128, 8)))}
    monkeypatch.setitem(kernels.FUSED_SHAPES, "glu", glu)
    assert kernels.launch_shape(1, "dense", 8, "glu") == (4, 512, 2, 4)
    assert kernels.launch_shape(1, "dense", 9, "glu") == (64, 128, 2, 8)
    assert kernels.launch_shape(128, "fp8", 8, "glu") == kernels.launch_shape(128, "fp8", 8)
    bn, bk, warps = kernels.SHAPES["dense"][0][1]
    assert kernels.launch_shape(1, "dense", 8) == (bn, bk, 2, warps)


def _close(got: torch.Tensor, want: torch.Tensor, what: Any) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    rel = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    assert rel < 2e-2, (what, rel)


@GPU[0]
@GPU[1]
@pytest.mark.parametrize("scheme", ["dense", "fp8", "int4"])
def test_fused_equals_unfused_cuda_eager_and_graph(scheme: str) -> None:
    if not kernels.available(torch.device("cuda")):
        pytest.skip("needs triton")
    gemv_experts.register()
    mod, forward = _module(scheme)
    calls = {"silu": 0}
    silu = kernels.moe_gemv_silu

    def counted(*a: Any, **kw: Any) -> torch.Tensor:
        calls["silu"] += 1
        return silu(*a, **kw)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "moe_gemv_silu", counted)
        for t in (1, 8):  # S = 8 and 64 pairs
            hidden, idx, w = _routes(t, seed=t)
            want = forward(hidden, idx, w, False)
            before = calls["silu"]
            got = forward(hidden, idx, w, True)
            assert calls["silu"] == before + 1  # the fused path ran
            _close(got, want, (scheme, t, "eager"))
            # captured in a CUDA graph, replayed on new inputs copied into the static ones
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                forward(hidden, idx, w, True)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = forward(hidden, idx, w, True)
            h2, i2, w2 = _routes(t, seed=100 + t)
            for static, new in ((hidden, h2), (idx, i2), (w, w2)):
                static.copy_(new)
            graph.replay()
            torch.cuda.synchronize()
            _close(out, forward(h2, i2, w2, False), (scheme, t, "graph"))
            assert torch.equal(out, forward(h2, i2, w2, True))  # same kernels, same bits


@GPU[0]
@GPU[1]
def test_fused_compiles_fullgraph_cuda() -> None:
    if not kernels.available(torch.device("cuda")):
        pytest.skip("needs triton")
    gemv_experts.register()
    _, forward = _module("dense")
    hidden, idx, w = _routes(1, seed=3)
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, i, r: forward(h, i, r, True), fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(hidden, idx, w), forward(hidden, idx, w, True))
    torch._dynamo.reset()
