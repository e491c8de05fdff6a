"""Quantized experts: codecs (dequantize / quantize), the export hook, resident kernels.

- `codecs`: `dequantize(fmt, parts, qconfig, dtype=...)` for fp8_block, ct_int4_pack, ct_fp8,
  mxfp4, gptq, awq; `quantize_fp8_block`, `quantize_int4_pack` and the `quantization_config`s.
- `export`: `ExpertQuantizer`, called by the exporter per output tensor (`--quantize fp8|int4`).
- `resident`: `quantize_resident(model, experts, scheme)`, quantized expert slots on the device
  with in-place swaps; `kernels`: the Triton decode GEMV it uses on CUDA.

This package depends only on torch, numpy and (optionally) compressed-tensors, plus
`premoe.errors`; it never imports the loader, exporter or server, which call into it.
"""

from __future__ import annotations

from premoe.quant.codecs import (
    FORMATS,
    dequantize,
    fp8_block_config,
    int4_pack_config,
    quantize_fp8_block,
    quantize_int4_pack,
)
from premoe.quant.export import SCHEMES, ExpertQuantizer, quantized_bytes
from premoe.quant.resident import QuantizedExperts, QuantizedResident, quantize_resident

__all__ = [
    "FORMATS",
    "SCHEMES",
    "ExpertQuantizer",
    "QuantizedExperts",
    "QuantizedResident",
    "dequantize",
    "fp8_block_config",
    "int4_pack_config",
    "quantize_fp8_block",
    "quantize_int4_pack",
    "quantize_resident",
    "quantized_bytes",
]
