"""Run by tests/quant/test_fused_experts.py under TRITON_INTERPRET=1: the one-kernel experts
forward (`fused_mlp.moe_mlp`) against a float64 reference of the same roundings (fp32 and bf16
activations), with ragged slices, then tiny models through `premoe_gemv` with it on and off.

Shape legend: T tokens, k routed per token, S = T*k pairs, H hidden, I intermediate, E experts.
"""

import torch
import torch.nn.functional as F

from premoe.quant import fused_mlp, gemv_experts, kernels
from tests.tiny import build_tiny

torch.manual_seed(0)
E, H, I = 5, 96, 48  # noqa: E741
ROUTES = [  # one token; repeated experts within a token and across tokens
    torch.tensor([[2, 0, 4, 1]]),
    torch.tensor([[3, 3], [0, 3], [4, 1]]),
]
# the table as it is (slices and chunks wider than I and H); slices of 32 (I = 48: one ragged),
# chunks of 64 (H = 96: ragged) and down steps of 64 (ragged); groups of 2 and 4 pairs (cut to
# 2 where k = 2)
SHAPES = [fused_mlp.MLP_SHAPES, ((kernels.ANY, (32, 1, 64, 64, 4)),),
          ((kernels.ANY, (16, 4, 64, 32, 4)),), ((kernels.ANY, (8, 2, 128, 64, 4)),)]  # fmt: skip


def reference(wu: torch.Tensor, wd: torch.Tensor, x: torch.Tensor, idx: torch.Tensor,
              rw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y [T, H], the sum of the absolute terms of each output [T, H]) in float64, with gate,
    up and the activation rounded to bf16 where the weights are bf16 (as bf16 activations
    stored between two kernels would be)."""
    t, k = idx.shape

    def rounded(v: torch.Tensor) -> torch.Tensor:
        return v.float().to(wu.dtype).double()

    ys, terms = torch.zeros(t, H, dtype=torch.float64), torch.zeros(t, H, dtype=torch.float64)
    for s in range(t * k):
        e, xr, w = idx.reshape(-1)[s], x[s // k].double(), rw.reshape(-1)[s].double()
        gate, up = rounded(wu[e].double() @ xr).chunk(2)
        act = rounded(F.silu(gate) * up)
        ys[s // k] += w * (wd[e].double() @ act)
        terms[s // k] += w.abs() * (wd[e].double().abs() @ act.abs())
    return ys, terms


worst = {torch.float32: 0.0, torch.bfloat16: 0.0}
for dtype in (torch.float32, torch.bfloat16):
    wu = (torch.randn(E, 2 * I, H) * 0.2).to(dtype)
    wd = (torch.randn(E, H, I) * 0.2).to(dtype)
    for idx in ROUTES:
        t, k = idx.shape
        x = torch.randn(t, H).to(dtype)
        rw = torch.rand(t, k)  # fp32 routing weights, as the routers give them
        ref, terms = reference(wu, wd, x, idx, rw)
        for shapes in SHAPES:
            saved, fused_mlp.MLP_SHAPES = fused_mlp.MLP_SHAPES, shapes
            y = fused_mlp.moe_mlp(x, idx, rw, wu, wd, out_dtype=dtype, glu=dtype)
            fused_mlp.MLP_SHAPES = saved
            assert y.shape == (t, H) and y.dtype == dtype, (y.shape, y.dtype)
            # one rounding to y's dtype, and fp32 summation slack
            bound = (2.0**-8 if dtype == torch.bfloat16 else 0.0) * ref.abs() + 1e-5 * terms
            err = (y.double() - ref).abs()
            ratio = float((err / (bound + 1e-30)).max())
            assert ratio <= 1.0, (dtype, tuple(idx.shape), shapes, ratio)
            worst[dtype] = max(worst[dtype], ratio)
print("mlp kernel ok", {str(d): round(w, 3) for d, w in worst.items()})

# whole tiny models through `premoe_gemv`: the one kernel taken for SiLU-gated experts
calls = {"n": 0}
moe_mlp = fused_mlp.moe_mlp


def counted(*a, **kw):
    calls["n"] += 1
    return moe_mlp(*a, **kw)


fused_mlp.moe_mlp = counted
impl = gemv_experts.register()
gemv_experts.FUSED_MLP = True
prompt = torch.randint(0, 100, (4, 5), generator=torch.Generator().manual_seed(1))
for family in ("qwen3_moe", "mixtral"):
    m = build_tiny(family, 0).eval()  # fp32: greedy tokens must agree with the eager loop
    outs = {}
    for name in ("eager", impl):
        m.config._experts_implementation = name
        before = calls["n"]
        with torch.no_grad():
            outs[name] = m.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                                    output_logits=True, return_dict_in_generate=True,
                                    pad_token_id=0)  # fmt: skip
        assert (calls["n"] > before) == (name == impl), (family, name, calls)
    assert torch.equal(outs["eager"].sequences, outs[impl].sequences), family
    diff = max((a - b).abs().max().item()
               for a, b in zip(outs["eager"].logits, outs[impl].logits, strict=True))  # fmt: skip
    assert diff < 1e-4, (family, diff)
    print(family, "fused mlp greedy ok", f"max logit diff {diff:.2e}")

# bf16 decode-shaped steps: the one kernel against the two-kernel path
mb = build_tiny("qwen3_moe", 0).to(torch.bfloat16).eval()
mb.config._experts_implementation = impl
x = torch.randint(0, 100, (4, 1), generator=torch.Generator().manual_seed(2))
logits = {}
for on in (False, True):
    gemv_experts.FUSED_MLP = on
    before = calls["n"]
    with torch.no_grad():
        logits[on] = mb(x).logits.float()
    assert (calls["n"] > before) == on, (on, calls)
rel = float((logits[True] - logits[False]).abs().max() / logits[False].abs().max())
assert rel < 2e-2, rel
assert (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean() >= 0.75
print("qwen3_moe bf16 fused mlp ok", f"max rel logit diff {rel:.2e}")
