"""Declarative quantization formats: the companion tensors of a quantized weight on disk.

One `QuantFormat` per format, as the hub publishes it (see ../shared/reference/
quantized_layouts.md). A dense linear weight `X.weight` of a quantized checkpoint is stored as
the components `X.<component>` the format lists (fp8 block: `X.weight` + `X.weight_scale_inv`;
GPTQ: `X.qweight`, `X.qzeros`, `X.scales`, `X.g_idx`); a fused expert tensor `gate_up_proj` as
`gate_up_proj<suffix>` (MXFP4: `_blocks`, `_scales`). Pruning moves every component with its
expert and never casts or re-quantizes it (DESIGN.md invariant 6).

`format_for_config` picks the entry from `config.json`'s `quantization_config`; a method this
module does not declare is refused with one line, never copied blindly.

Shape legend: N output rows, K input columns of a linear weight; E experts; b block size;
g group size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from premoe.errors import CheckpointError, UnsupportedArchitectureError

Shape = tuple[int, ...]
Shapes = Mapping[str, Shape]


@dataclass(frozen=True)
class QuantFormat:
    """One on-disk weight format.

    `components`: the tensors that replace a dense `weight` of a per-expert linear, always
    present; `optional`: companions that may be present (zero points, group indices, input
    scales). `fused`: suffixes that replace a fused expert tensor's name (`gate_up_proj` ->
    `gate_up_proj_blocks`, `gate_up_proj_scales`); empty when the format has no fused layout.
    `codec`: the name `premoe.quant.codecs.dequantize` knows it by (None: stored dense).
    `dense_shape(shapes)`: the dense [..., N, K] weight the components encode; `check(shapes,
    qconfig)`: a one-line problem when the companions' shapes do not fit each other, else None.
    """

    name: str
    components: tuple[str, ...]
    optional: tuple[str, ...] = ()
    fused: tuple[str, ...] = ()
    codec: str | None = None
    dense_shape: Callable[[Shapes], Shape] = lambda s: s["weight"]
    check: Callable[[Shapes, Mapping[str, Any]], str | None] = lambda s, q: None
    notes: str = ""

    @property
    def quantized(self) -> bool:
        return self.codec is not None

    def all_components(self) -> frozenset[str]:
        return frozenset((*self.components, *self.optional))


# ---- shape rules ---------------------------------------------------------------------------------


def _block_size(qconfig: Mapping[str, Any]) -> tuple[int, int] | None:
    size = qconfig.get("weight_block_size")
    return (int(size[0]), int(size[1])) if size else None


def _fp8_block_check(s: Shapes, q: Mapping[str, Any]) -> str | None:
    n, k = s["weight"]  # [N, K]
    block = _block_size(q)
    scale = s["weight_scale_inv"]  # [ceil(N/b0), ceil(K/b1)]
    if block is None:
        return None if len(scale) == 2 else f"scale shape {scale} is not a 2-D block grid"
    want = (math.ceil(n / block[0]), math.ceil(k / block[1]))
    return None if tuple(scale) == want else f"scale {tuple(scale)} != {want} for weight {(n, k)}"


def _group_size(q: Mapping[str, Any]) -> int | None:
    for group in (q.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if weights.get("group_size"):
            return int(weights["group_size"])
    return int(q["group_size"]) if q.get("group_size") and int(q["group_size"]) > 0 else None


def _ct_pack_shape(s: Shapes) -> Shape:
    n, packed = s["weight_packed"]  # [N, K/8] int32
    return (n, packed * 8)


def _ct_pack_check(s: Shapes, q: Mapping[str, Any]) -> str | None:
    n, k = _ct_pack_shape(s)
    scale = s["weight_scale"]  # [N, K/g]
    g = _group_size(q)
    want_cols = math.ceil(k / g) if g else None
    if scale[0] != n or (want_cols is not None and scale[1] != want_cols):
        return f"weight_scale {tuple(scale)} does not fit weight_packed {s['weight_packed']}"
    if s["weight_shape"] != (2,):
        return f"weight_shape has shape {s['weight_shape']}, expected (2,)"
    return None


def _ct_fp8_check(s: Shapes, q: Mapping[str, Any]) -> str | None:
    n, _ = s["weight"]
    scale = s["weight_scale"]  # [1] tensor, [N, 1] channel, or a block grid
    ok = scale in ((1,), ()) or (len(scale) == 2 and scale[0] in (n, 1) and scale[1] == 1)
    ok = ok or len(scale) == 2  # block strategy: a grid
    return None if ok else f"weight_scale {tuple(scale)} does not fit weight {s['weight']}"


def _mxfp4_shape(s: Shapes) -> Shape:
    *lead, n, kb, sixteen = s["blocks"]  # [..., N, K/32, 16] uint8
    return (*lead, n, kb * sixteen * 2)


def _mxfp4_check(s: Shapes, q: Mapping[str, Any]) -> str | None:
    blocks, scales = s["blocks"], s["scales"]
    if len(blocks) < 3 or blocks[-1] != 16 or tuple(scales) != tuple(blocks[:-1]):
        return f"scales {tuple(scales)} do not fit blocks {tuple(blocks)}"
    return None


def _gptq_shape(s: Shapes) -> Shape:
    k8, n = s["qweight"]  # [K/8, N] packed along K
    return (n, k8 * 8)


def _gptq_check(s: Shapes, q: Mapping[str, Any]) -> str | None:
    n, k = _gptq_shape(s)
    scales = s["scales"]  # [K/g, N]
    if scales[1] != n or s["qzeros"][1] * 8 != n:
        return f"scales {tuple(scales)} / qzeros {s['qzeros']} do not fit qweight {s['qweight']}"
    g = _group_size(q)
    if g and scales[0] != math.ceil(k / g):
        return f"scales {tuple(scales)} do not fit group size {g} of qweight {s['qweight']}"
    return None


def _awq_shape(s: Shapes) -> Shape:
    k, n8 = s["qweight"]  # [K, N/8] packed along N
    return (n8 * 8, k)


def _awq_check(s: Shapes, q: Mapping[str, Any]) -> str | None:
    n, k = _awq_shape(s)
    scales = s["scales"]  # [K/g, N]
    if scales[1] != n or tuple(s["qzeros"]) != (scales[0], n // 8):
        return f"scales {tuple(scales)} / qzeros {s['qzeros']} do not fit qweight {s['qweight']}"
    return None


# ---- the formats ---------------------------------------------------------------------------------

DENSE = QuantFormat("dense", components=("weight",), notes="bf16/fp16/fp32 weights")
FP8_BLOCK = QuantFormat(
    "fp8_block",
    components=("weight", "weight_scale_inv"),
    codec="fp8_block",
    check=_fp8_block_check,
    notes="quant_method fp8 (DeepSeek-V3/R1, Qwen3-*-FP8, MiniMax-M2): e4m3 + block scales",
)
CT_INT4_PACK = QuantFormat(
    "ct_int4_pack",
    components=("weight_packed", "weight_scale", "weight_shape"),
    optional=("weight_zero_point", "weight_g_idx"),
    codec="ct_int4_pack",
    dense_shape=_ct_pack_shape,
    check=_ct_pack_check,
    notes="compressed-tensors pack-quantized (Kimi-K2, llm-compressor W4A16)",
)
CT_FP8 = QuantFormat(
    "ct_fp8",
    components=("weight", "weight_scale"),
    optional=("input_scale",),
    codec="ct_fp8",
    check=_ct_fp8_check,
    notes="compressed-tensors float-quantized fp8 (GLM-4.5-FP8, llm-compressor FP8)",
)
MXFP4 = QuantFormat(
    "mxfp4",
    components=(),
    fused=("_blocks", "_scales"),
    codec="mxfp4",
    dense_shape=_mxfp4_shape,
    check=_mxfp4_check,
    notes="gpt-oss: fused [E, N, K/32, 16] e2m1 blocks + e8m0 scales; biases stay bf16",
)
GPTQ = QuantFormat(
    "gptq",
    components=("qweight", "qzeros", "scales"),
    optional=("g_idx",),
    codec="gptq",
    dense_shape=_gptq_shape,
    check=_gptq_check,
    notes="GPTQ int4 per expert (qweight packed along K)",
)
AWQ = QuantFormat(
    "awq",
    components=("qweight", "qzeros", "scales"),
    codec="awq",
    dense_shape=_awq_shape,
    check=_awq_check,
    notes="AWQ GEMM int4 per expert (qweight packed along N)",
)

FORMATS: tuple[QuantFormat, ...] = (DENSE, FP8_BLOCK, CT_INT4_PACK, CT_FP8, MXFP4, GPTQ, AWQ)

# quantization_config["quant_method"] -> format; compressed-tensors is resolved by its `format`
_BY_METHOD: dict[str, QuantFormat] = {"fp8": FP8_BLOCK, "mxfp4": MXFP4, "gptq": GPTQ, "awq": AWQ}
_CT_BY_FORMAT: dict[str, QuantFormat] = {
    "pack-quantized": CT_INT4_PACK,
    "float-quantized": CT_FP8,
    "dense": DENSE,
}
_REFUSED = {
    "bitsandbytes": "bitsandbytes-serialised checkpoints cannot be pruned (flat-packed weights); "
    "prune the unquantized checkpoint and quantize the export",
}


def quantization_config(config: Any) -> dict[str, Any] | None:
    """The config's `quantization_config` as a plain dict (None when the model is dense)."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    if not isinstance(q, Mapping):
        q = q.to_dict() if hasattr(q, "to_dict") else vars(q)
    return dict(q)


def format_for_config(config: Any) -> QuantFormat:
    """The weight format a checkpoint declares; `UnsupportedArchitectureError` when premoe does
    not know it (one line naming the method)."""
    q = quantization_config(config)
    if q is None:
        return DENSE
    method = str(q.get("quant_method", "")).lower()
    if method in _REFUSED or q.get("load_in_4bit") or q.get("load_in_8bit"):
        raise UnsupportedArchitectureError(_REFUSED["bitsandbytes"])
    if method == "compressed-tensors":
        fmts = {q.get("format")} | {
            g.get("format") for g in (q.get("config_groups") or {}).values() if g.get("format")
        }
        fmts.discard(None)
        if len(fmts) != 1 or next(iter(fmts)) not in _CT_BY_FORMAT:
            raise UnsupportedArchitectureError(
                f"compressed-tensors format {sorted(map(str, fmts)) or 'unset'} is not supported "
                f"(supported: {', '.join(_CT_BY_FORMAT)})"
            )
        return _CT_BY_FORMAT[next(iter(fmts))]
    if method == "awq" and str(q.get("version", "gemm")).lower() != "gemm":
        raise UnsupportedArchitectureError(
            f"AWQ version {q.get('version')!r} is not supported (only 'gemm')"
        )
    if method == "fp8" and not q.get("weight_block_size"):
        raise UnsupportedArchitectureError(
            "quant_method fp8 without weight_block_size (per-tensor fp8) is not supported; "
            "only the block layout (weight + weight_scale_inv) is"
        )
    try:
        return _BY_METHOD[method]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"quantization method {method or 'unset'!r} in config.json is not supported; "
            f"supported: fp8 (block), compressed-tensors (pack-quantized, float-quantized), "
            "mxfp4, gptq, awq"
        ) from None


def check_components(fmt: QuantFormat, module: str, shapes: Shapes, qconfig: Any) -> None:
    """Raise `CheckpointError` when `module`'s companions do not fit each other."""
    problem = fmt.check(shapes, qconfig or {})
    if problem:
        raise CheckpointError(
            f"{module}: {problem}; the checkpoint's {fmt.name} tensors are corrupt"
        )
