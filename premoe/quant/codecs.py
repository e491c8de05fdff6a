"""Quantization codecs: dense weights from quantized checkpoint tensors, and back.

`dequantize(fmt, parts, qconfig, dtype=...)` turns the tensors one quantized linear layer stores on
disk (its "parts", named by their local suffix: ``weight``, ``weight_scale_inv``, ``qweight``...)
into the dense weight as `nn.Linear` holds it, ``[N_out, K_in]`` (MXFP4 keeps its leading expert
dims). Each result equals, bit for bit, what transformers 5.x / compressed-tensors produce on the
CPU for the same tensors (tests/quant/test_codecs.py compares against them); GPTQ and AWQ, which
transformers only reads through `gptqmodel`, follow the published packing rules written out below.

Format knowledge is data: `FORMATS` maps each format name to the parts it requires and accepts and
to one decode function. The quantizers (`quantize_fp8_block`, `quantize_int4_pack`) and the
`quantization_config` builders are the inverse, used when exporting quantized experts.

Packing conventions (the bit position of element i inside one int32 word is ``bits * i``):

- compressed-tensors pack-quantized: ``weight_packed [N, ceil(K*bits/32)]`` packs along K; values
  are stored with an offset of ``2**(bits-1)`` and are signed after unpacking; an asymmetric zero
  point ``weight_zero_point [ceil(N*bits/32), G]`` is packed the same way along dim 0.
  ``w = (q - zp) * scale`` computed in the scale's dtype (`compressed_tensors...forward_helpers`).
- GPTQ (AutoGPTQ / GPTQModel): ``qweight [K/8, N]`` packs along K, ``qzeros [G, N/8]`` along N,
  ``w[k, n] = scales[g, n] * (q[k, n] - z[g, n])`` with ``g = g_idx[k]``; checkpoint format
  ``gptq`` (v1, the default) stores ``z - 1``, ``gptq_v2`` stores ``z``.
- AWQ GEMM: ``qweight [K, N/8]`` and ``qzeros [G, N/8]`` pack along N with the interleaved order
  ``[0, 2, 4, 6, 1, 3, 5, 7]`` (nibble i holds column ``order[i]`` of its group of 8);
  ``w[k, n] = (q[k, n] - z[g, n]) * scales[g, n]``, ``g = k // group_size``.
- MXFP4 (gpt-oss): ``blocks [..., N, K/32, 16]`` uint8, low nibble = even element; ``scales``
  E8M0 (bias 127); ``w = FP4_E2M1[nibble] * 2**(scale - 127)``.
- FP8 block (DeepSeek-V3 style): ``weight`` e4m3 ``[N, K]``, ``weight_scale_inv
  [ceil(N/b0), ceil(K/b1)]``; ``w = weight * scale_inv`` per block, computed in fp32.

One module because every format's decoder and encoder share the packing helpers and the
format table, and the tests check each encoder against its decoder side by side.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from premoe.errors import UsageError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0

# E2M1 values by nibble (transformers.integrations.mxfp4.FP4_VALUES)
FP4_E2M1 = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i]


Parts = Mapping[str, torch.Tensor]
QConfig = Mapping[str, Any]


@dataclass(frozen=True)
class FormatSpec:
    """One quantization format: the parts it needs, the parts it may carry, how to decode."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    decode: Callable[[Parts, QConfig, torch.dtype], torch.Tensor]


# ----------------------------------------------------------------------------- bit helpers


def _unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned `bits`-wide fields of int32 words along `dim`, element i at bit ``bits*i``."""
    if 32 % bits:
        raise UsageError(f"{bits}-bit packing is not supported (bits must divide 32)")
    per = 32 // bits
    dim = dim % packed.ndim
    x = packed.to(torch.int32).movedim(dim, -1)  # [..., W]
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    fields = (x.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., W, per]
    return fields.reshape(*x.shape[:-1], x.shape[-1] * per).movedim(-1, dim)


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, b0: int, b1: int) -> torch.Tensor:
    """Per-block scales [..., R, C] -> per-element [..., rows, cols]; last blocks may be partial."""
    s = scale.repeat_interleave(b0, dim=-2)[..., :rows, :]
    return s.repeat_interleave(b1, dim=-1)[..., :cols]


def _as_int(x: Any) -> int:
    return int(x.item()) if isinstance(x, torch.Tensor) else int(x)


# ----------------------------------------------------------------------------- fp8 block


def _block_from_grid(
    shape: Sequence[int], grid: Sequence[int], configured: Sequence[int] | None, what: str
) -> tuple[int, int]:
    rows, cols = int(shape[-2]), int(shape[-1])
    gr, gc = int(grid[-2]), int(grid[-1])
    if configured is not None:
        b0, b1 = (int(v) for v in configured)
        if math.ceil(rows / b0) != gr or math.ceil(cols / b1) != gc:
            raise UsageError(
                f"{what}: scale grid {gr}x{gc} does not match weight {rows}x{cols} "
                f"with block {b0}x{b1}"
            )
        return b0, b1
    if rows % gr or cols % gc:
        raise UsageError(
            f"{what}: weight {rows}x{cols} is not divisible by the scale grid {gr}x{gc}; "
            "give weight_block_size"
        )
    return rows // gr, cols // gc


def _scale_to_fp32(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.uint8:  # E8M0 exponents stored as bytes
        return (scale.to(torch.float32) - 127.0).exp2()
    return scale.to(torch.float32)


def _decode_fp8_block(parts: Parts, qconfig: QConfig, dtype: torch.dtype) -> torch.Tensor:
    w = parts["weight"]  # [..., N, K] e4m3
    s = parts["weight_scale_inv"]  # [..., ceil(N/b0), ceil(K/b1)]
    rows, cols = w.shape[-2:]
    wf = w.to(torch.float32)
    if s.ndim < 2 or s.numel() == 1:
        return (wf * _scale_to_fp32(s).reshape(-1)[0]).to(dtype)
    b0, b1 = _block_from_grid(w.shape, s.shape, qconfig.get("weight_block_size"), "fp8_block")
    scale = _expand_blocks(_scale_to_fp32(s), rows, cols, b0, b1)  # [..., N, K]
    return (wf * scale).to(dtype)


# ----------------------------------------------------------------------------- compressed-tensors


def _ct_weight_args(qconfig: QConfig) -> dict[str, Any]:
    """The `weights` args of the config group that quantizes the routed experts.

    Chosen like transformers' `get_experts_scheme`: the group whose ``re:`` targets mention
    experts, else the first group with class-name targets, else the first group.
    """
    groups = qconfig.get("config_groups") or {}
    if not groups:
        raise UsageError("compressed-tensors quantization_config has no config_groups")
    values = [g for g in groups.values() if isinstance(g, Mapping)]
    if not values:
        raise UsageError("compressed-tensors config_groups hold no quantization scheme")
    chosen = None
    for g in values:
        if any(t.startswith("re:") and "experts" in t for t in g.get("targets", [])):
            chosen = g
            break
    if chosen is None:
        chosen = next(
            (g for g in values if any(not t.startswith("re:") for t in g.get("targets", []))),
            values[0],
        )
    args = chosen.get("weights")
    if not isinstance(args, Mapping):
        raise UsageError("compressed-tensors config group has no weights scheme")
    out = dict(args)
    out.setdefault("format", chosen.get("format") or qconfig.get("format"))
    return out


def _decode_ct_int4_pack(parts: Parts, qconfig: QConfig, dtype: torch.dtype) -> torch.Tensor:
    args = _ct_weight_args(qconfig)
    if args.get("type", "int") != "int":
        raise UsageError(f"ct_int4_pack expects integer weights, the config says {args['type']}")
    bits = int(args.get("num_bits", 4))
    packed = parts["weight_packed"]  # [..., N, ceil(K*bits/32)] int32
    scale = parts["weight_scale"]  # [..., N, G]
    if "weight_shape" in parts and parts["weight_shape"].numel():
        rows, cols = (_as_int(v) for v in parts["weight_shape"].reshape(-1, 2)[0])
    else:
        rows, cols = packed.shape[-2], packed.shape[-1] * (32 // bits)
    offset = 1 << (bits - 1)
    q = _unpack_int32(packed, bits, dim=-1)[..., :cols] - offset  # [..., N, K] signed
    if scale.ndim < 2:
        scale = scale.reshape(-1, 1) if scale.numel() == rows else scale.reshape(1, 1)
    groups = scale.shape[-1]
    v = q.to(scale.dtype)
    zp = parts.get("weight_zero_point")
    if zp is not None and not args.get("symmetric", True):
        z = _unpack_int32(zp, bits, dim=-2)[..., :rows, :] - offset  # [..., N, G] signed
        z = z.to(scale.dtype)
    else:
        z = None
    g_idx = parts.get("weight_g_idx")
    if g_idx is not None and g_idx.numel() == cols:
        trivial = torch.arange(cols, device=g_idx.device) // max(1, cols // groups)
        if not torch.equal(g_idx.to(torch.long), trivial):
            # activation-ordered groups: column k uses group g_idx[k]
            idx = g_idx.to(torch.long)
            if z is not None:
                v = v - z[..., idx]
            return (v * scale[..., idx]).to(dtype)
    if cols % groups:
        raise UsageError(f"ct_int4_pack: K={cols} is not divisible into {groups} groups")
    g = cols // groups
    v = v.unflatten(-1, (groups, g))  # [..., N, G, g]
    if z is not None:
        v = v - z.unsqueeze(-1)
    return (v * scale.unsqueeze(-1)).flatten(-2).to(dtype)


def _decode_ct_fp8(parts: Parts, qconfig: QConfig, dtype: torch.dtype) -> torch.Tensor:
    w = parts["weight"]  # [N, K] fp8
    s = parts["weight_scale"]  # [1] | [N, 1] | [ceil(N/b0), ceil(K/b1)]
    wf = w.to(torch.float32)
    sf = s.to(torch.float32)
    rows, cols = w.shape[-2:]
    if s.numel() == 1:
        return (wf * sf.reshape(())).to(dtype)
    if s.ndim >= 2 and s.shape[-1] == 1 and s.shape[-2] == rows:
        return (wf * sf).to(dtype)
    block = None
    try:
        block = _ct_weight_args(qconfig).get("block_structure")
    except UsageError:
        block = None
    b0, b1 = _block_from_grid(w.shape, s.shape, block, "ct_fp8")
    return (wf * _expand_blocks(sf, rows, cols, b0, b1)).to(dtype)


# ----------------------------------------------------------------------------- mxfp4


def _decode_mxfp4(parts: Parts, qconfig: QConfig, dtype: torch.dtype) -> torch.Tensor:
    blocks = parts["blocks"].to(torch.uint8)  # [..., N, G, 16]
    scales = parts["scales"]  # [..., N, G]
    if tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise UsageError(
            f"mxfp4: blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}"
        )
    exp = scales.to(torch.int32) - 127
    lut = torch.tensor(FP4_E2M1, dtype=dtype, device=blocks.device)
    lo = lut[(blocks & 0x0F).to(torch.int)]
    hi = lut[(blocks >> 4).to(torch.int)]
    vals = torch.stack((lo, hi), dim=-1).flatten(-2)  # [..., N, G, 32]
    vals = torch.ldexp(vals, exp.unsqueeze(-1)).to(dtype)
    return vals.flatten(-2)  # [..., N, K]


# ----------------------------------------------------------------------------- gptq / awq


def _group_size(qconfig: QConfig, cols: int, groups: int) -> int:
    g = qconfig.get("group_size", qconfig.get("q_group_size"))
    if g is None or int(g) <= 0:
        return cols if groups == 1 else cols // groups
    return int(g)


def _decode_gptq(parts: Parts, qconfig: QConfig, dtype: torch.dtype) -> torch.Tensor:
    bits = int(qconfig.get("bits", 4))
    qweight = parts["qweight"]  # [K*bits/32, N]
    scales = parts["scales"]  # [G, N]
    q = _unpack_int32(qweight, bits, dim=0)  # [K, N]
    cols, rows = q.shape
    g_idx = parts.get("g_idx")
    if g_idx is None:
        g = _group_size(qconfig, cols, scales.shape[0])
        if cols % g:
            raise UsageError(f"gptq: group size {g} does not divide K={cols}")
        g_idx = torch.arange(cols, device=q.device) // g
    idx = g_idx.to(torch.long)  # [K]
    v2 = str(qconfig.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
    if "qzeros" in parts:
        z = _unpack_int32(parts["qzeros"], bits, dim=1)[:, :rows]  # [G, N]
        if not v2:
            z = z + 1  # v1 checkpoints store zero - 1
    elif qconfig.get("sym", True):
        z = torch.full_like(scales, 1 << (bits - 1), dtype=torch.int32)
    else:
        raise UsageError("gptq: asymmetric checkpoint without qzeros")
    w = (q - z[idx]).to(scales.dtype) * scales[idx]  # [K, N]
    return w.t().contiguous().to(dtype)


def _awq_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C*per] fields of AWQ words, columns restored to natural order."""
    raw = _unpack_int32(packed, bits, dim=-1)  # nibble order
    per = 32 // bits
    order = torch.tensor(AWQ_ORDER if bits == 4 else tuple(range(per)), device=packed.device)
    inverse = torch.argsort(order)  # column j sits at nibble inverse[j]
    raw = raw.unflatten(-1, (-1, per))[..., inverse]
    return raw.flatten(-2)


def _decode_awq(parts: Parts, qconfig: QConfig, dtype: torch.dtype) -> torch.Tensor:
    bits = int(qconfig.get("bits", qconfig.get("w_bit", 4)))
    q = _awq_unpack(parts["qweight"], bits)  # [K, N]
    scales = parts["scales"]  # [G, N]
    cols, rows = q.shape
    g = _group_size(qconfig, cols, scales.shape[0])
    if cols % g:
        raise UsageError(f"awq: group size {g} does not divide K={cols}")
    idx = torch.arange(cols, device=q.device) // g
    if "qzeros" in parts:
        z = _awq_unpack(parts["qzeros"], bits)[:, :rows]  # [G, N]
    else:
        z = torch.full_like(scales, 1 << (bits - 1), dtype=torch.int32)
    w = (q - z[idx]).to(scales.dtype) * scales[idx]  # [K, N]
    return w.t().contiguous().to(dtype)


FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec("fp8_block", ("weight", "weight_scale_inv"), (), _decode_fp8_block),
        FormatSpec(
            "ct_int4_pack",
            ("weight_packed", "weight_scale"),
            ("weight_shape", "weight_zero_point", "weight_g_idx"),
            _decode_ct_int4_pack,
        ),
        FormatSpec("ct_fp8", ("weight", "weight_scale"), ("input_scale",), _decode_ct_fp8),
        FormatSpec("mxfp4", ("blocks", "scales"), (), _decode_mxfp4),
        FormatSpec("gptq", ("qweight", "scales"), ("qzeros", "g_idx"), _decode_gptq),
        FormatSpec("awq", ("qweight", "scales"), ("qzeros",), _decode_awq),
    )
}


def dequantize(
    fmt: str, parts: Parts, qconfig: QConfig | None = None, *, dtype: torch.dtype
) -> torch.Tensor:
    """The dense weight `[N_out, K_in]` (mxfp4: `[..., N, K]`) that `parts` encode in `fmt`.

    fp8_block, ct_int4_pack and mxfp4 also take stacked parts with leading dims (`[E, ...]`, one
    shared block / group size) and return `[..., N, K]`.
    """
    spec = FORMATS.get(fmt)
    if spec is None:
        raise UsageError(f"unknown quantization format {fmt!r}; known: {', '.join(FORMATS)}")
    missing = [p for p in spec.required if p not in parts]
    if missing:
        raise UsageError(f"{fmt}: missing part(s) {', '.join(missing)}")
    return spec.decode(parts, qconfig or {}, dtype)


# ----------------------------------------------------------------------------- quantizers


def quantize_fp8_block(
    w: torch.Tensor, block: Sequence[int] = (128, 128)
) -> dict[str, torch.Tensor]:
    """`w [N, K]` -> ``{"weight": e4m3 [N, K], "weight_scale_inv": fp32 [ceil(N/b0), ceil(K/b1)]}``.

    ``scale_inv = amax / 448`` per block (1 for an all-zero block), ``weight = w / scale_inv``
    saturated to ±448; `dequantize("fp8_block", ...)` multiplies back.
    """
    if w.ndim != 2:
        raise UsageError(f"quantize_fp8_block expects a 2-D weight, got shape {tuple(w.shape)}")
    b0, b1 = (int(v) for v in block)
    if b0 <= 0 or b1 <= 0:
        raise UsageError(f"fp8 block size must be positive, got {b0}x{b1}")
    rows, cols = w.shape
    gr, gc = math.ceil(rows / b0), math.ceil(cols / b1)
    wf = w.detach().to(torch.float32)
    padded = torch.zeros(gr * b0, gc * b1, dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = wf
    amax = padded.reshape(gr, b0, gc, b1).abs().amax(dim=(1, 3))  # [gr, gc]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = wf / _expand_blocks(scale_inv, rows, cols, b0, b1)
    q = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return {"weight": q.contiguous(), "weight_scale_inv": scale_inv.contiguous()}


def _ct_int_args(group_size: int, symmetric: bool, bits: int = 4) -> Any:
    try:
        from compressed_tensors.quantization import QuantizationArgs
    except ImportError as exc:  # pragma: no cover - exercised only without the package
        raise UsageError(
            "int4 quantization needs compressed-tensors: pip install compressed-tensors"
        ) from exc
    return QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        strategy="group",
        group_size=group_size,
        dynamic=False,
    )


def quantize_int4_pack(
    w: torch.Tensor, *, group_size: int = 128, symmetric: bool = True
) -> dict[str, torch.Tensor]:
    """`w [N, K]` -> compressed-tensors pack-quantized W4A16 parts, through compressed-tensors.

    Returns ``weight_packed`` int32 ``[N, K/8]``, ``weight_scale`` ``[N, K/g]`` in `w`'s dtype,
    ``weight_shape`` ``[2]`` and, when asymmetric, ``weight_zero_point`` ``[ceil(N/8), K/g]``.
    Round to nearest on min/max group statistics (compressed-tensors' `calculate_qparams`).
    Without compressed-tensors installed, symmetric quantization falls back to
    `quantize_int4_pack_torch`, which writes the same bytes.
    """
    if w.ndim != 2:
        raise UsageError(f"quantize_int4_pack expects a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if group_size <= 0 or cols % group_size:
        raise UsageError(f"int4 group size {group_size} does not divide K={cols}")
    if symmetric and not _has_compressed_tensors():
        return quantize_int4_pack_torch(w, group_size=group_size)
    args = _ct_int_args(group_size, symmetric)
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    wd = w.detach()
    grouped = wd.unflatten(-1, (cols // group_size, group_size))  # [N, G, g]
    scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)  # [N, G]
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state: dict[str, torch.Tensor] = {"weight": wd, "weight_scale": scale.to(wd.dtype)}
    if not symmetric:
        state["weight_zero_point"] = zp.to(torch.int8)
    out = PackedQuantizationCompressor.compress(state, scheme)
    return {k: v.contiguous() for k, v in out.items()}


def _has_compressed_tensors() -> bool:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return False
    return True


def quantize_int4_pack_torch(w: torch.Tensor, *, group_size: int = 128) -> dict[str, torch.Tensor]:
    """Symmetric int4 pack-quantization in plain torch, byte for byte what compressed-tensors
    0.20 writes (tests/quant/test_codecs.py checks it): ``scale = max|w| / 7.5`` per group in
    `w`'s dtype (an all-zero group gets the dtype's eps), ``q = round(clamp(w / scale, -8, 7))``,
    stored as ``q + 8`` nibbles, element i of a word at bits ``4 i``."""
    rows, cols = w.shape
    if group_size <= 0 or cols % group_size:
        raise UsageError(f"int4 group size {group_size} does not divide K={cols}")
    wd = w.detach()
    g = wd.unflatten(-1, (cols // group_size, group_size))  # [N, G, g]
    zero = torch.zeros((), dtype=wd.dtype, device=wd.device)
    lo = torch.minimum(g.amin(-1), zero)
    hi = torch.maximum(g.amax(-1), zero)
    half_range = torch.tensor(15.0, device=wd.device).to(wd.dtype) / 2
    scale = torch.maximum(lo.abs(), hi.abs()) / half_range  # [N, G]
    eps = torch.tensor(torch.finfo(wd.dtype).eps, dtype=wd.dtype, device=wd.device)
    scale = torch.where(scale == 0, eps, scale)
    q = (g / scale.unsqueeze(-1)).float().clamp(-8.0, 7.0).round().to(torch.int64) + 8
    q = q.reshape(rows, cols // 8, 8)  # [N, K/8, 8] unsigned nibbles
    shifts = torch.arange(0, 32, 4, device=wd.device, dtype=torch.int64)
    words = (q << shifts).sum(-1)  # [N, K/8] in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return {
        "weight_packed": words.contiguous(),
        "weight_scale": scale.contiguous(),
        "weight_shape": torch.tensor([rows, cols]),
    }


# ----------------------------------------------------------------------------- configs


def fp8_block_config(
    block: Sequence[int] = (128, 128), modules_to_not_convert: Sequence[str] = ()
) -> dict[str, Any]:
    """The `quantization_config` of a DeepSeek-style fp8 block checkpoint."""
    cfg: dict[str, Any] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [int(block[0]), int(block[1])],
    }
    if modules_to_not_convert:
        cfg["modules_to_not_convert"] = list(modules_to_not_convert)
    return cfg


def int4_pack_config(
    targets: Sequence[str],
    *,
    group_size: int = 128,
    symmetric: bool = True,
    ignore: Sequence[str] = ("lm_head",),
) -> dict[str, Any]:
    """A compressed-tensors `quantization_config`: W4A16 pack-quantized for `targets` only.

    `targets` are compressed-tensors module patterns (``re:`` regexes anchored at the start);
    by default the export hook passes regexes matching exactly the routed experts' linears.
    """
    args = _ct_int_args(group_size, symmetric)
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    scheme = QuantizationScheme(targets=list(targets), weights=args, format="pack-quantized")
    cfg = QuantizationConfig(
        config_groups={"group_0": scheme},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=list(ignore),
    )
    out = cfg.model_dump(mode="json", exclude_none=False)
    out["quant_method"] = "compressed-tensors"
    return out
