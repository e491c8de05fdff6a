"""Quantized expert weights: codecs (dequantize / quantize), export hook, resident kernels.

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

__all__ = [
    "FORMATS",
    "dequantize",
    "fp8_block_config",
    "int4_pack_config",
    "quantize_fp8_block",
    "quantize_int4_pack",
]
