"""Quantize routed experts while exporting: the per-tensor hook and the config it implies.

The exporter streams every output tensor of the pruned checkpoint through one `ExpertQuantizer`:

    q = ExpertQuantizer("fp8")                      # or "int4", options below
    for key, tensor, is_expert in pruned_tensors:   # output (renumbered) names, per-expert layout
        for name, t in q(key, tensor, expert_weight=is_expert).items():
            writer.add(name, t)
    config["quantization_config"] = q.quantization_config()

Routed-expert linear weights (`expert_weight=True`, a 2-D ``....weight``) become the scheme's
tensors under the hub's per-expert names (``experts.3.gate_proj.weight`` ->
``experts.3.gate_proj.weight`` + ``experts.3.gate_proj.weight_scale_inv`` for fp8;
``weight_packed`` / ``weight_scale`` / ``weight_shape`` for int4); every other tensor passes
through unchanged. The config is built from what was seen, so it needs no family knowledge:

- fp8 (``quant_method: fp8``, DeepSeek-V3 layout): every other linear-like module (2-D
  ``.weight``) is listed in ``modules_to_not_convert``, so that transformers and vLLM keep it in
  the source dtype;
- int4 (compressed-tensors ``pack-quantized`` W4A16): ``targets`` are ``re:`` patterns made from
  the expert module names seen, with layer and expert numbers generalised to ``\\d+``; nothing
  else is targeted (``ignore`` keeps ``lm_head`` for engines that target by class).

A fused on-disk expert tensor (3-D, e.g. gpt-oss) has no per-expert hub format to quantize to
and is a usage error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from premoe.errors import UsageError
from premoe.quant.codecs import (
    fp8_block_config,
    int4_pack_config,
    quantize_fp8_block,
    quantize_int4_pack,
)

log = logging.getLogger(__name__)

Scheme = Literal["fp8", "int4"]
SCHEMES: tuple[str, ...] = ("fp8", "int4")

# bytes per weight element on disk / resident, companions excluded (see `bytes_per_element`)
_BITS = {"fp8": 8, "int4": 4}


def check_scheme(scheme: str) -> Scheme:
    if scheme not in SCHEMES:
        raise UsageError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    return scheme  # type: ignore[return-value]


def quantized_bytes(
    rows: int,
    cols: int,
    scheme: str,
    *,
    block: Sequence[int] = (128, 128),
    group_size: int = 128,
    scale_bytes: int = 2,
    symmetric: bool = True,
) -> int:
    """Bytes one `[rows, cols]` weight takes in `scheme`, companions included.

    fp8: 1 byte per element + fp32 ``[ceil(rows/b0), ceil(cols/b1)]`` scales. int4: ``cols/8``
    int32 words per row + ``[rows, cols/g]`` scales of `scale_bytes` (+ packed zero points when
    asymmetric) + the 2-element int64 ``weight_shape``.
    """
    scheme = check_scheme(scheme)
    if scheme == "fp8":
        b0, b1 = block
        return rows * cols + 4 * (-(-rows // b0)) * (-(-cols // b1))
    groups = -(-cols // group_size)
    out = rows * (-(-cols * 4 // 32)) * 4 + rows * groups * scale_bytes + 16
    if not symmetric:
        out += (-(-rows // 8)) * groups * 4
    return out


def _module_pattern(module: str) -> str:
    """`model.layers.3.mlp.experts.7.gate_proj` -> `re:^model\\.layers\\.\\d+\\....gate_proj$`."""
    parts = [r"\d+" if p.isdigit() else re.escape(p) for p in module.split(".")]
    return "re:^" + r"\.".join(parts) + "$"


@dataclass
class ExpertQuantizer:
    """Quantizes routed-expert weights tensor by tensor; see the module docstring.

    `block`: fp8 block (rows, cols), must divide every expert weight (transformers' loader
    infers the block from the scale grid). `group_size`/`symmetric`: int4 groups along K.
    """

    scheme: Scheme
    block: tuple[int, int] = (128, 128)
    group_size: int = 128
    symmetric: bool = True
    _targets: dict[str, None] = field(default_factory=dict, init=False, repr=False)
    _not_converted: dict[str, None] = field(default_factory=dict, init=False, repr=False)
    quantized: int = field(default=0, init=False)
    bytes_in: int = field(default=0, init=False)
    bytes_out: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.scheme = check_scheme(self.scheme)
        self.block = (int(self.block[0]), int(self.block[1]))
        if min(self.block) <= 0:
            raise UsageError(f"fp8 block must be positive, got {self.block}")
        if self.group_size <= 0:
            raise UsageError(f"int4 group size must be positive, got {self.group_size}")

    def __call__(
        self, key: str, tensor: torch.Tensor, *, expert_weight: bool
    ) -> dict[str, torch.Tensor]:
        """Output tensors for checkpoint tensor `key` (name -> tensor, in writing order)."""
        if not expert_weight:
            if key.endswith(".weight") and tensor.ndim == 2:
                self._not_converted[key[: -len(".weight")]] = None
            return {key: tensor}
        if not key.endswith(".weight") or tensor.ndim != 2:
            raise UsageError(
                f"cannot quantize expert tensor {key} {tuple(tensor.shape)}: quantized export "
                "needs per-expert 2-D `.weight` tensors (a fused expert layout has no quantized "
                "hub format)"
            )
        if not tensor.is_floating_point() or tensor.element_size() < 2:
            raise UsageError(f"{key} is already quantized ({tensor.dtype}); export it as it is")
        prefix = key[: -len("weight")]
        rows, cols = tensor.shape
        self.check(key, rows, cols)
        if self.scheme == "fp8":
            parts = quantize_fp8_block(tensor, self.block)
            out = {key: parts["weight"], prefix + "weight_scale_inv": parts["weight_scale_inv"]}
        else:
            parts = quantize_int4_pack(tensor, group_size=self.group_size, symmetric=self.symmetric)
            out = {prefix + name: parts[name] for name in sorted(parts)}
        self._targets[_module_pattern(key[: -len(".weight")])] = None
        self.quantized += 1
        self.bytes_in += tensor.numel() * tensor.element_size()
        self.bytes_out += sum(t.numel() * t.element_size() for t in out.values())
        return out

    def check(self, key: str, rows: int, cols: int) -> None:
        """Raise `UsageError` when a `[rows, cols]` expert weight cannot be quantized (the
        exporter calls this for every expert tensor shape before writing anything)."""
        if self.scheme == "fp8":
            b0, b1 = self.block
            if rows % b0 or cols % b1:
                raise UsageError(
                    f"fp8 block {b0}x{b1} does not divide {key} {rows}x{cols}; pick a block that "
                    "divides the expert weights (--block)"
                )
        elif cols % self.group_size:
            raise UsageError(
                f"int4 group size {self.group_size} does not divide the {cols} input columns of "
                f"{key}; pick a group size that divides it (--group-size)"
            )

    def quantization_config(self) -> dict[str, Any]:
        """The `quantization_config` for config.json (call after every tensor went through)."""
        if not self.quantized:
            raise UsageError("no routed-expert weight was quantized; nothing to describe")
        if self.scheme == "fp8":
            return fp8_block_config(self.block, list(self._not_converted))
        return int4_pack_config(
            list(self._targets),
            group_size=self.group_size,
            symmetric=self.symmetric,
            ignore=["lm_head"],
        )

    def summary(self) -> str:
        return (
            f"{self.quantized} expert weights quantized to {self.scheme}: "
            f"{self.bytes_in / 2**20:.1f} MiB -> {self.bytes_out / 2**20:.1f} MiB"
        )


__all__ = ["SCHEMES", "ExpertQuantizer", "Scheme", "check_scheme", "quantized_bytes"]
