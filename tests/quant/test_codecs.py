"""premoe.quant.codecs against transformers' / compressed-tensors' own dequantization.

GPTQ and AWQ are only read by transformers through `gptqmodel`, so they are checked against
`_ref_gptq` / `_ref_awq` below: element-by-element loops written from the published packing rules
(AutoGPTQ `QuantLinear.pack`, AutoAWQ `WQLinear_GEMM.from_linear`), sharing no code with the codec.
"""

from __future__ import annotations

import pytest
import torch

from premoe.errors import UsageError
from premoe.quant.codecs import (
    dequantize,
    int4_pack_config,
    quantize_fp8_block,
    quantize_int4_pack,
    quantize_int4_pack_torch,
)

ct = pytest.importorskip("compressed_tensors")


def _rand_fp8(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)


# ----------------------------------------------------------------------------- fp8 block


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_block_equals_transformers(scale_dtype: torch.dtype, dtype: torch.dtype) -> None:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    w = _rand_fp8(96, 256)
    s = (torch.rand(3, 2) * 0.01 + 1e-4).to(scale_dtype)
    ours = dequantize("fp8_block", {"weight": w, "weight_scale_inv": s}, {}, dtype=dtype)
    ref = Fp8Dequantize(None)._dequantize_one(w, s, output_dtype=dtype)
    assert ours.dtype == dtype and ours.shape == (96, 256)
    assert torch.equal(ours, ref)
    # the configured block size gives the same answer
    cfg = {"weight_block_size": [32, 128]}
    assert torch.equal(
        dequantize("fp8_block", {"weight": w, "weight_scale_inv": s}, cfg, dtype=dtype), ref
    )


def test_fp8_block_ceil_grid_and_roundtrip() -> None:
    torch.manual_seed(0)
    w = torch.randn(200, 301)
    parts = quantize_fp8_block(w, (128, 128))
    assert parts["weight"].dtype == torch.float8_e4m3fn
    assert parts["weight_scale_inv"].shape == (2, 3)
    assert parts["weight_scale_inv"].dtype == torch.float32
    # a partial last block needs the configured block size
    with pytest.raises(UsageError):
        dequantize("fp8_block", parts, {}, dtype=torch.float32)
    d = dequantize("fp8_block", parts, {"weight_block_size": [128, 128]}, dtype=torch.float32)
    assert (d - w).abs().max() / w.abs().max() < 0.07  # e4m3: 3 mantissa bits
    # exact on a divisible shape: the scale is amax/448 per block
    w = torch.randn(256, 128)
    p = quantize_fp8_block(w, (128, 128))
    amax = w.reshape(2, 128, 1, 128).abs().amax(dim=(1, 3))
    assert torch.equal(p["weight_scale_inv"], amax / 448)


# ----------------------------------------------------------------------------- mxfp4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_equals_transformers(dtype: torch.dtype) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(120, 134, (3, 10, 4), generator=g, dtype=torch.uint8)
    ours = dequantize("mxfp4", {"blocks": blocks, "scales": scales}, {}, dtype=dtype)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, K, N] (in-memory layout)
    assert ours.shape == (3, 10, 128)
    assert torch.equal(ours, ref.transpose(1, 2))


# ----------------------------------------------------------------------------- compressed-tensors


def _ct_decompress(parts: dict, cfg: dict) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme.model_validate(cfg["config_groups"]["group_0"])
    return PackedQuantizationCompressor.decompress(dict(parts), scheme)["weight"]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128])
def test_ct_int4_equals_compressed_tensors(symmetric: bool, group_size: int) -> None:
    torch.manual_seed(2)
    w = torch.randn(48, 256, dtype=torch.bfloat16)
    parts = quantize_int4_pack(w, group_size=group_size, symmetric=symmetric)
    assert parts["weight_packed"].shape == (48, 32) and parts["weight_packed"].dtype == torch.int32
    assert parts["weight_scale"].shape == (48, 256 // group_size)
    assert ("weight_zero_point" in parts) == (not symmetric)
    if not symmetric:
        assert parts["weight_zero_point"].shape == (6, 256 // group_size)
    cfg = int4_pack_config(["re:.*experts.*"], group_size=group_size, symmetric=symmetric)
    ref = _ct_decompress(parts, cfg)
    for dtype in (torch.bfloat16, torch.float32):
        ours = dequantize("ct_int4_pack", parts, cfg, dtype=dtype)
        assert torch.equal(ours, ref.to(dtype))
    err = (ref.float() - w.float()).abs().max() / w.float().abs().max()
    assert err < 0.2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_torch_fallback_writes_the_library_bytes(dtype: torch.dtype) -> None:
    torch.manual_seed(8)
    w = torch.randn(24, 128).to(dtype)
    w[3, :32] = 0  # an all-zero group: the scale is the dtype's eps
    w[5, 64:96] = 1e-3
    ref = quantize_int4_pack(w, group_size=32)
    ours = quantize_int4_pack_torch(w, group_size=32)
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k


def test_ct_int4_random_packed_words() -> None:
    """Arbitrary packed words (every nibble value, negative int32s) decode like the library."""
    g = torch.Generator().manual_seed(3)
    packed = torch.randint(-(2**31), 2**31 - 1, (16, 8), generator=g, dtype=torch.int32)
    scale = torch.rand(16, 2, generator=g).to(torch.bfloat16)
    zp = torch.randint(-(2**31), 2**31 - 1, (2, 2), generator=g, dtype=torch.int32)
    for symmetric in (True, False):
        cfg = int4_pack_config(["Linear"], group_size=32, symmetric=symmetric)
        parts = {
            "weight_packed": packed,
            "weight_scale": scale,
            "weight_shape": torch.tensor([16, 64]),
        }
        if not symmetric:
            parts["weight_zero_point"] = zp
        ours = dequantize("ct_int4_pack", parts, cfg, dtype=torch.bfloat16)
        assert torch.equal(ours, _ct_decompress(parts, cfg).to(torch.bfloat16))


def test_ct_int4_activation_order_g_idx() -> None:
    torch.manual_seed(4)
    w = torch.randn(8, 64)
    parts = quantize_int4_pack(w, group_size=32)
    cfg = int4_pack_config(["Linear"], group_size=32)
    plain = dequantize("ct_int4_pack", parts, cfg, dtype=torch.float32)
    trivial = torch.arange(64) // 32
    assert torch.equal(
        dequantize("ct_int4_pack", {**parts, "weight_g_idx": trivial}, cfg, dtype=torch.float32),
        plain,
    )
    perm = trivial.flip(0)
    out = dequantize("ct_int4_pack", {**parts, "weight_g_idx": perm}, cfg, dtype=torch.float32)
    q = plain / parts["weight_scale"].float().repeat_interleave(32, 1)
    assert torch.allclose(out, q * parts["weight_scale"].float()[:, perm], atol=1e-6)


@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
def test_ct_fp8_equals_compressed_tensors(kind: str) -> None:
    from compressed_tensors.compressors.naive_quantized.base import (
        NaiveQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = _rand_fp8(256, 128, seed=5)
    shape = {"tensor": (1,), "channel": (256, 1), "block": (2, 1)}[kind]
    s = torch.rand(*shape) * 0.01 + 1e-4
    extra = {"block_structure": [128, 128]} if kind == "block" else {}
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=kind, **extra)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    cfg = {"config_groups": {"group_0": scheme.model_dump(mode="json")}}
    ref = NaiveQuantizationCompressor.decompress({"weight": w, "weight_scale": s}, scheme)
    for dtype in (torch.bfloat16, torch.float32):
        ours = dequantize(
            "ct_fp8",
            {"weight": w, "weight_scale": s, "input_scale": torch.ones(1)},
            cfg,
            dtype=dtype,
        )
        assert torch.equal(ours, ref["weight"].to(dtype))
    if kind != "block":  # transformers' expert path: fp32 product, then the model dtype
        tf = (w.to(torch.float32) * s.to(torch.float32)).to(torch.bfloat16)
        assert torch.equal(
            dequantize("ct_fp8", {"weight": w, "weight_scale": s}, cfg, dtype=torch.bfloat16), tf
        )


# ----------------------------------------------------------------------------- gptq / awq


def _pack_along(
    vals: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))
) -> torch.Tensor:
    """Reference packer: word j holds elements 8j..8j+7 of `dim`; nibble i = element order[i]."""
    v = vals.movedim(dim, -1)
    out = torch.zeros(*v.shape[:-1], v.shape[-1] // 8, dtype=torch.int64)
    for j in range(v.shape[-1] // 8):
        for i in range(8):
            out[..., j] |= (v[..., 8 * j + order[i]].to(torch.int64) & 0xF) << (4 * i)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.movedim(-1, dim)


def _ref_gptq(
    q: torch.Tensor, z: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    kk, nn = q.shape
    out = torch.empty(nn, kk, dtype=torch.float32)
    for k in range(kk):
        for n in range(nn):
            g = int(g_idx[k])
            out[n, k] = float(scales[g, n]) * (int(q[k, n]) - int(z[g, n]))
    return out


@pytest.mark.parametrize("v2", [False, True])
def test_gptq_reference(v2: bool) -> None:
    g = torch.Generator().manual_seed(6)
    kk, nn, gs = 64, 16, 16
    q = torch.randint(0, 16, (kk, nn), generator=g)
    z = torch.randint(1, 15, (kk // gs, nn), generator=g)
    scales = (torch.rand(kk // gs, nn, generator=g) * 0.1).to(torch.float16)
    g_idx = torch.randperm(kk, generator=g) // gs  # activation order (desc_act)
    stored_z = z if v2 else z - 1
    parts = {
        "qweight": _pack_along(q, 0),
        "qzeros": _pack_along(stored_z, 1),
        "scales": scales,
        "g_idx": g_idx.to(torch.int32),
    }
    cfg = {
        "bits": 4,
        "group_size": gs,
        "sym": False,
        "checkpoint_format": "gptq_v2" if v2 else "gptq",
    }
    ours = dequantize("gptq", parts, cfg, dtype=torch.float32)
    ref = _ref_gptq(q, z, scales, g_idx)
    assert ours.shape == (nn, kk)
    # the codec multiplies in the scales' dtype (fp16), as AutoGPTQ does
    assert torch.allclose(ours, ref, rtol=1e-3, atol=1e-3)
    # without g_idx: contiguous groups
    parts.pop("g_idx")
    ours = dequantize("gptq", parts, cfg, dtype=torch.float32)
    assert torch.allclose(
        ours, _ref_gptq(q, z, scales, torch.arange(kk) // gs), rtol=1e-3, atol=1e-3
    )


def test_awq_reference() -> None:
    g = torch.Generator().manual_seed(7)
    kk, nn, gs = 64, 32, 32
    q = torch.randint(0, 16, (kk, nn), generator=g)
    z = torch.randint(0, 16, (kk // gs, nn), generator=g)
    scales = (torch.rand(kk // gs, nn, generator=g) * 0.1).to(torch.float16)
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    parts = {
        "qweight": _pack_along(q, 1, order),
        "qzeros": _pack_along(z, 1, order),
        "scales": scales,
    }
    ours = dequantize("awq", parts, {"bits": 4, "group_size": gs}, dtype=torch.float32)
    ref = _ref_gptq(q, z, scales, torch.arange(kk) // gs)  # same math, natural layout
    assert ours.shape == (nn, kk)
    assert torch.allclose(ours, ref, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- errors


def test_errors() -> None:
    with pytest.raises(UsageError, match="unknown quantization format"):
        dequantize("nf4", {}, {}, dtype=torch.float32)
    with pytest.raises(UsageError, match="missing part"):
        dequantize("fp8_block", {"weight": _rand_fp8(4, 4)}, {}, dtype=torch.float32)
    with pytest.raises(UsageError, match="does not divide"):
        quantize_int4_pack(torch.randn(8, 96), group_size=64)
    with pytest.raises(UsageError):
        quantize_fp8_block(torch.randn(2, 3, 4))
