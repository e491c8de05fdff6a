"""Run by tests/quant/test_resident.py under TRITON_INTERPRET=1: the Triton GEMV's arithmetic
on the CPU, against the codecs' dequantized weights, and a whole tiny model through it."""

import torch

from premoe.quant import kernels
from premoe.quant.codecs import dequantize, quantize_fp8_block, quantize_int4_pack
from premoe.quant.resident import quantize_resident
from tests.tiny import build_tiny


def silu_gated_ref(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 silu(gate) * up of rows [gate | up] in `dtype`, rounded once (an activation kernel)."""
    gate, up = h.to(dtype).float().chunk(2, dim=-1)
    return (gate * torch.sigmoid(gate) * up).to(dtype).float()


torch.manual_seed(0)
E, N, K, S = 3, 48, 96, 5
# (scheme, fp8 block or int4 group): per-chunk scale, per-element scale gather, masked K chunks
CASES = [
    ("fp8", (16, 32)),  # whole scale blocks per chunk (mode 1)
    ("fp8", (16, 48)),  # per-element scales (mode 2)
    ("fp8", (48, 512)),  # chunk inside one scale block (mode 0)
    ("int4", 16),
    ("int4", 32),
]
for _scheme, opt in CASES[:3]:
    mode = kernels.launch_shape(opt[1], "fp8")[2]
    assert mode == {32: 1, 48: 2, 512: 0}[opt[1]], (opt, mode)
# int4 chunks inside one group (one scale per row) and wider than a group (scale per element)
WHOLE = {"int4": ((kernels.ANY, (16, 32, 4)),)}
CASES += [("int4", 32, WHOLE), ("int4", 16, WHOLE)]
_saved = dict(kernels.SHAPES)
kernels.SHAPES.update(WHOLE)
assert kernels.launch_shape(32, "int4")[2] == 0 and kernels.launch_shape(16, "int4")[2] == 2
kernels.SHAPES.update(_saved)
for case in CASES:
    scheme, opt = case[0], case[1]
    saved = dict(kernels.SHAPES)
    kernels.SHAPES.update(case[2] if len(case) > 2 else {})
    dense = torch.randn(E, N, K, dtype=torch.bfloat16)
    if scheme == "fp8":
        parts = [quantize_fp8_block(dense[e], opt) for e in range(E)]
        w = torch.stack([p["weight"] for p in parts])
        s = torch.stack([p["weight_scale_inv"] for p in parts])
        fmt, cfg, blk = "fp8_block", {}, opt
    else:
        parts = [quantize_int4_pack(dense[e], group_size=opt) for e in range(E)]
        w = torch.stack([p["weight_packed"] for p in parts])
        s = torch.stack([p["weight_scale"] for p in parts])
        args = {"num_bits": 4, "group_size": opt}
        fmt, blk = "ct_int4_pack", (1, opt)
        cfg = {"config_groups": {"g": {"targets": ["Linear"], "weights": args}}}
    x = torch.randn(4, K, dtype=torch.bfloat16)
    rows = torch.tensor([0, 1, 1, 3, 2])
    eids = torch.tensor([2, 0, 1, 1, 2])
    for round_dtype, deq_dtype in ((torch.bfloat16, torch.bfloat16), (None, torch.float32)):
        # exact reference: the codec computes int4 in the scales' dtype, so give it fp32 scales
        src = parts
        if round_dtype is None and scheme == "int4":
            src = [{**p, "weight_scale": p["weight_scale"].float()} for p in parts]
        deq = torch.stack([dequantize(fmt, p, cfg, dtype=deq_dtype) for p in src])
        y = kernels.moe_gemv(
            x, rows, eids, w, s, n=N, k=K, scale_block=blk, int4=scheme == "int4",
            round_dtype=round_dtype,
        )  # fmt: skip
        ref = torch.stack([deq[eids[i]].float() @ x[rows[i]].float() for i in range(S)])
        err = (y - ref).abs().max().item()
        assert err < 1e-4 * ref.abs().max().item(), (scheme, opt, round_dtype, err)
        # the activation read as the row loads (`glu`): x rows are an up projection's [gate | up]
        h = torch.randn(4, 2 * K)
        act = silu_gated_ref(h, torch.bfloat16)
        y = kernels.moe_gemv(
            h, rows, eids, w, s, n=N, k=K, scale_block=blk, int4=scheme == "int4",
            round_dtype=round_dtype, glu=torch.bfloat16,
        )  # fmt: skip
        ref = torch.stack([deq[eids[i]].float() @ act[rows[i]] for i in range(S)])
        err = (y - ref).abs().max().item()
        assert err < 1e-4 * ref.abs().max().item(), (scheme, opt, round_dtype, "glu", err)
    kernels.SHAPES.update(saved)
print("fp8 ok", "int4 ok")

# the whole quantized forward through the kernel (decode-sized) vs the dequantizing eager path

for scheme, opt in (("fp8", {"block": (16, 16)}), ("int4", {"group_size": 16})):
    m = build_tiny("qwen3_moe", 0, hidden_size=64, moe_intermediate_size=32, vocab_size=128)
    m = m.to(torch.bfloat16).eval()
    paths = [n for n, mod in m.named_modules() if n.endswith("mlp.experts")]
    qr = quantize_resident(m, paths, scheme, **opt)
    x = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        a = m(x).logits.float()
        for q in qr.layers.values():
            q.gemv_rows = 0
        b = m(x).logits.float()
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 1e-2, (scheme, rel)
    print(scheme, "model ok", rel)

# plain weights ([E, N, K] and gpt-oss's transposed [E, K, N]) and the `premoe_gemv` experts
# implementation on decode-sized inputs vs transformers' eager loop

from premoe.quant.gemv_experts import IMPLEMENTATION, register  # noqa: E402

E, N, K = 3, 40, 96
rows, eids = torch.tensor([0, 1, 1, 3, 2]), torch.tensor([2, 0, 1, 1, 2])
for transposed in (False, True):
    w = torch.randn(E, N, K)
    x = torch.randn(4, K)
    stored = w.transpose(1, 2).contiguous() if transposed else w
    y = kernels.moe_gemv(x, rows, eids, stored, n=N, k=K, transposed=transposed)
    ref = torch.stack([w[eids[i]] @ x[rows[i]] for i in range(len(rows))])
    assert (y - ref).abs().max().item() < 1e-4, transposed
    # rows as pairs per x row: pair s reads row s // 2 (no rows tensor)
    pairs = torch.tensor([2, 0, 1, 1, 2, 0, 0, 1])
    y = kernels.moe_gemv(x, 2, pairs, stored, n=N, k=K, transposed=transposed)
    ref = torch.stack([w[pairs[i]] @ x[i // 2] for i in range(len(pairs))])
    assert y.shape == ref.shape and (y - ref).abs().max().item() < 1e-4, transposed
    for dtype in kernels.GLU_DTYPES:  # the activation read as the row loads (`glu`)
        h = torch.randn(len(pairs), 2 * K)
        y = kernels.moe_gemv(h, 1, pairs, stored, n=N, k=K, transposed=transposed, glu=dtype)
        act = silu_gated_ref(h, dtype)
        ref = torch.stack([w[pairs[i]] @ act[i] for i in range(len(pairs))])
        assert (y - ref).abs().max().item() < 1e-4, (transposed, dtype)
# a plain linear layer's few rows (`gemv_linear`): rounded once to x's 16-bit dtype, narrow and
# wide table shapes, ragged N and K
for dtype in (torch.bfloat16, torch.float16):
    for t, n, k in ((1, 40, 96), (2, 700, 300), (1, 3000, 520)):
        w = (torch.randn(n, k) * 0.1).to(dtype)
        x = torch.randn(t, k).to(dtype)
        bias = torch.randn(n).to(dtype)
        bias[::3] = float("-inf")  # a row mask (rowmask.py) as the bias
        for b in (None, bias):
            y = kernels.gemv_linear(x, w, b)
            ref = x.double() @ w.double().T + (0.0 if b is None else b.double())
            ref = ref.to(dtype)
            ulp = ref.double().abs() * (2.0**-7 if dtype == torch.bfloat16 else 2.0**-10) + 1e-6
            assert y.shape == (t, n) and y.dtype == dtype, (y.shape, y.dtype)
            finite = ref.isfinite()
            assert torch.equal(y.isfinite(), finite) and (y[~finite] == ref[~finite]).all()
            err = (y.double() - ref.double()).abs()[finite]
            assert (err <= ulp[finite]).all(), (dtype, t, n, k, b is None)
print("linear ok")
register()
for family in ("qwen3_moe", "gpt_oss", "mixtral"):
    m = build_tiny(family, 0).eval()
    x = torch.randint(0, 100, (1, 1))
    with torch.no_grad():
        m.config._experts_implementation = "eager"
        a = m(x).logits
        m.config._experts_implementation = IMPLEMENTATION
        b = m(x).logits
    assert (a - b).abs().max().item() < 1e-4, family
print("dense ok")
