"""Run by tests/quant/test_resident.py under TRITON_INTERPRET=1: the fused experts kernels
(`kernels.moe_gemv_silu`: up projection + silu(gate) * up; `kernels.moe_gemv_wsum`: down
projection + routing weight + sum over k) against a float64 reference from the same weights, in
every weight format, then whole tiny models through them.

Shape legend: T tokens, k routed per token, S = T*k pairs, H hidden, I intermediate, E experts.
"""

import torch
import torch.nn.functional as F

from premoe.quant import gemv_experts, kernels
from premoe.quant.codecs import dequantize, quantize_fp8_block, quantize_int4_pack
from premoe.quant.resident import quantize_resident
from tests.tiny import build_tiny

torch.manual_seed(0)
E, H, I = 5, 96, 48  # noqa: E741
# (T, k, top_k_index): one token; repeated experts within a token and across tokens
ROUTES = [
    torch.tensor([[2, 0, 4, 1]]),
    torch.tensor([[3, 3], [0, 3], [4, 1]]),
    torch.tensor([[1, 2, 1], [4, 4, 0], [2, 3, 0], [1, 1, 1]]),
]
# launch shapes: the tables as they are (chunks wider than K; fp8 whole blocks per chunk, int4
# a scale per element), and blocks that leave ragged N and K edges (silu: I = 48 in blocks of
# 32; wsum: H = 96 in blocks of 64, K = I = 48 in chunks of 32), with one scale per chunk row
RAGGED = {
    fuse: {
        mode: ((kernels.ANY, (bn, 16 if mode == "int4" else 32, 4)),)
        for mode in ("dense", "fp8", "int4")
    }  # fmt: skip
    for fuse, bn in (("silu", 32), ("wsum", 64))
}
assert I % 32 and H % 64  # really ragged
assert kernels.launch_shape(32, "fp8", 8, "silu")[2] == 1  # fp8 (16, 32) blocks, default table
assert kernels.launch_shape(16, "int4", 8, "wsum")[2] == 2


def quantized(scheme: str, dense: torch.Tensor) -> dict:
    """Kernel arguments and the fp32 / bf16 dequantized weights of dense [E, N, K]."""
    if scheme == "dense":
        return {"w": dense, "s": None, "kw": {}, "deq": {None: dense.double()}}
    if scheme == "fp8":
        parts = [quantize_fp8_block(d, (16, 32)) for d in dense]
        w, s = (torch.stack([p[n] for p in parts]) for n in ("weight", "weight_scale_inv"))
        fmt, kw = "fp8_block", {"scale_block": (16, 32)}
        cfg = {"weight_block_size": [16, 32]}  # K = 48: partial blocks, not inferable
    else:
        parts = [quantize_int4_pack(d, group_size=16) for d in dense]
        w, s = (torch.stack([p[n] for p in parts]) for n in ("weight_packed", "weight_scale"))
        fmt, kw = "ct_int4_pack", {"scale_block": (1, 16), "int4": True}
        args = {"num_bits": 4, "group_size": 16}
        cfg = {"config_groups": {"g": {"targets": ["Linear"], "weights": args}}}
        # the codec computes int4 in the scales' dtype: fp32 scales for the exact values
        parts = [{**p, "weight_scale": p["weight_scale"].float()} for p in parts]
    deq = {
        rd: torch.stack([dequantize(fmt, p, cfg, dtype=rd or torch.float32) for p in parts])
        for rd in (None, torch.bfloat16)
    }
    return {"w": w, "s": s, "kw": kw, "deq": {rd: d.double() for rd, d in deq.items()}}


def check(got: torch.Tensor, ref: torch.Tensor, terms: torch.Tensor, what: tuple) -> float:
    """One rounding to got's dtype (to nearest), plus fp32 summation slack (generous: 1e-5)
    scaled by the sum of the absolute terms of each output."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    rel = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}[got.dtype]
    err = (got.double() - ref).abs()
    bound = rel * ref.abs() + 1e-5 * terms + 1e-30
    worst = float((err / bound).max())
    assert worst <= 1.0, (what, worst, float(err.max()))
    return worst


def silu_reference(w_up: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> tuple:
    """(silu(gate) * up [S, I], the sum of its absolute terms [S, I]) in float64."""
    k = idx.shape[1]
    acts, terms = [], []
    for s in range(idx.numel()):
        e, xr = idx.reshape(-1)[s], x[s // k].double()
        gate, up = (w_up[e] @ xr).chunk(2)
        g_abs, u_abs = (w_up[e].abs() @ xr.abs()).chunk(2)
        acts.append(F.silu(gate) * up)
        terms.append(g_abs * up.abs() + u_abs * F.silu(gate).abs())
    return torch.stack(acts), torch.stack(terms)


worst = 0.0
for scheme in ("dense", "fp8", "int4"):
    wu_dense = torch.randn(E, 2 * I, H, dtype=torch.bfloat16)
    wd_dense = torch.randn(E, H, I, dtype=torch.bfloat16)
    qu, qd = quantized(scheme, wu_dense), quantized(scheme, wd_dense)
    for idx in ROUTES:
        t, k = idx.shape
        x = torch.randn(t, H, dtype=torch.bfloat16)
        rw = torch.rand(t, k)  # fp32 routing weights, as the routers give them
        for rd in (None, torch.bfloat16) if scheme != "dense" else (None,):
            wu, wd = qu["deq"][rd], qd["deq"][rd]
            for shapes in ({}, RAGGED):
                saved = {f: dict(v) for f, v in kernels.FUSED_SHAPES.items()}
                for fuse, table in shapes.items():
                    kernels.FUSED_SHAPES[fuse].update(table)
                what = (scheme, tuple(idx.shape), rd, bool(shapes))
                # up + act against float64 of the same weights
                act = kernels.moe_gemv_silu(x, idx, qu["w"], qu["s"], n=I, k=H,
                                            out_dtype=torch.bfloat16, round_dtype=rd,
                                            **qu["kw"])  # fmt: skip
                a_ref, a_terms = silu_reference(wu, x, idx)
                worst = max(worst, check(act, a_ref, a_terms, ("silu", *what)))
                # down + weighted sum over k, from the kernel's own bf16 activations
                h = act.double()
                hs = [wd[idx.reshape(-1)[s]] @ h[s] for s in range(t * k)]
                hs_t = [wd[idx.reshape(-1)[s]].abs() @ h[s].abs() for s in range(t * k)]
                o_ref = torch.stack([sum(rw[i, j] * hs[i * k + j] for j in range(k))
                                     for i in range(t)])  # fmt: skip
                o_terms = torch.stack([sum(rw[i, j] * hs_t[i * k + j] for j in range(k))
                                       for i in range(t)])  # fmt: skip
                for out_dtype in (torch.bfloat16, torch.float32):
                    out = kernels.moe_gemv_wsum(act, idx, rw, qd["w"], qd["s"], n=H, k=I,
                                                out_dtype=out_dtype, round_dtype=rd,
                                                **qd["kw"])  # fmt: skip
                    assert out.dtype == out_dtype and out.shape == (t, H)
                    worst = max(worst, check(out, o_ref, o_terms, ("wsum", out_dtype, *what)))
                for fuse, table in saved.items():
                    kernels.FUSED_SHAPES[fuse] = table
print("fused kernels ok", f"worst error / bound {worst:.3f}")

# the fused path must be the one taken, and the unfused one must stay for gpt-oss
calls = {"moe_gemv": 0, "moe_gemv_silu": 0, "moe_gemv_wsum": 0}
for name in calls:

    def counted(*a, _f=getattr(kernels, name), _n=name, **kw):
        calls[_n] += 1
        return _f(*a, **kw)

    setattr(kernels, name, counted)

# whole tiny models (T = 4 sequences x k = 2 = 8 pairs = E: the kernel path at decode)
impl = gemv_experts.register()
gemv_experts.FUSE = True  # off by default in serve (see its docstring)
m = build_tiny("qwen3_moe", 0).eval()  # fp32: fused output unrounded, greedy tokens must agree
prompt = torch.randint(0, 100, (4, 5), generator=torch.Generator().manual_seed(1))
outs = {}
for name in ("eager", impl):
    m.config._experts_implementation = name
    with torch.no_grad():
        outs[name] = m.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                output_logits=True, return_dict_in_generate=True,
                                pad_token_id=0)  # fmt: skip
assert calls["moe_gemv_silu"] > 0 and calls["moe_gemv_wsum"] == calls["moe_gemv_silu"], calls
assert calls["moe_gemv"] == 0, calls
assert torch.equal(outs["eager"].sequences, outs[impl].sequences)
diff = max(
    (a - b).abs().max().item() for a, b in zip(outs["eager"].logits, outs[impl].logits, strict=True)
)
assert diff < 1e-4, diff
print("qwen3_moe greedy ok", f"max logit diff {diff:.2e}")

# bf16: decode-shaped steps (one token per sequence) close to the eager loop
mb = build_tiny("qwen3_moe", 0).to(torch.bfloat16).eval()
x = torch.randint(0, 100, (4, 1), generator=torch.Generator().manual_seed(2))
with torch.no_grad():
    mb.config._experts_implementation = "eager"
    a = mb(x).logits.float()
    mb.config._experts_implementation = impl
    b = mb(x).logits.float()
rel = float((a - b).abs().max() / a.abs().max())
assert rel < 2e-2, rel
assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75
print("qwen3_moe bf16 ok", f"max rel logit diff {rel:.2e}")

# quantized resident experts: fused and unfused GEMV paths agree
for scheme, opt in (("fp8", {"block": (16, 16)}), ("int4", {"group_size": 16})):
    mq = build_tiny("qwen3_moe", 0, hidden_size=64, moe_intermediate_size=32, vocab_size=128)
    mq = mq.to(torch.bfloat16).eval()
    paths = [n for n, mod in mq.named_modules() if n.endswith("mlp.experts")]
    qr = quantize_resident(mq, paths, scheme, **opt)
    got = {}
    for fuse in (False, True):
        for q in qr.layers.values():
            q.fuse = fuse
        before = dict(calls)
        with torch.no_grad():
            got[fuse] = mq(x).logits.float()
        assert (calls["moe_gemv_silu"] > before["moe_gemv_silu"]) == fuse, (scheme, calls)
    rel = float((got[True] - got[False]).abs().max() / got[False].abs().max())
    assert rel < 2e-2, (scheme, rel)
    print(scheme, "resident fused ok", f"max rel logit diff {rel:.2e}")

# gpt-oss (clamped interleaved gate, biases) stays on the unfused path
before = dict(calls)
mg = build_tiny("gpt_oss", 0).eval()
with torch.no_grad():
    mg.config._experts_implementation = "eager"
    a = mg(x).logits
    mg.config._experts_implementation = impl
    b = mg(x).logits
assert calls["moe_gemv"] > before["moe_gemv"] and calls["moe_gemv_silu"] == before["moe_gemv_silu"]
assert (a - b).abs().max().item() < 1e-4
print("gpt_oss unfused ok")
