"""Tiny quantized checkpoints in exactly the layouts the hub publishes (tests only).

`write_quantized(src, dst, fmt)` rewrites a tiny bf16/fp32 checkpoint saved by `save_pretrained`
(hub layout) into one of the formats of `premoe.arch.formats`, the way publishers ship them:

- fp8_block (DeepSeek-V3 / Qwen3-FP8): every linear weight but the head as e4m3 `weight` +
  `weight_scale_inv` per block (fp32 scales, or bf16 with `scale_dtype`); routers stay dense.
- ct_int4_pack (Kimi-K2 / llm-compressor W4A16): routed experts as `weight_packed` (int32),
  `weight_scale`, `weight_shape` (packed with compressed-tensors' own packer), symmetric groups.
- ct_fp8 (float-quantized): routed experts as e4m3 `weight` + per-channel `weight_scale`.
- mxfp4 (gpt-oss): fused `*_blocks` / `*_scales` [E, N, K/32, 16] with gate/up interleaved.
- gptq / awq: per-expert `qweight` / `qzeros` / `scales` (+ `g_idx`) as GPTQModel / AutoAWQ pack
  them (transformers cannot load these without gptqmodel; the tests check bytes).

`add_mtp(folder)` appends a DeepSeek-V3-style MTP layer (decoder layer N with its own experts,
router, bias, enorm/hnorm/eh_proj/shared_head) and sets `num_nextn_predict_layers: 1`.

Shape legend: N output rows, K input columns, E experts, b block, g group size.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from safetensors.torch import load_file, save_file

E4M3_MAX = 448.0
_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
_EXPERT = re.compile(r"\.experts\.\d+\.")


def fp8_block(w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype) -> dict:
    n, k = w.shape  # [N, K]
    b0, b1 = block
    gn, gk = -(-n // b0), -(-k // b1)
    wf = w.float()
    scale = torch.empty(gn, gk)
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    for i in range(gn):
        for j in range(gk):
            blk = wf[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1]
            s = (blk.abs().amax() / E4M3_MAX).clamp(min=1e-12).to(scale_dtype).float()
            scale[i, j] = s
            q[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = (blk / s).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale_inv": scale.to(scale_dtype)}


def ct_int4(w: torch.Tensor, group: int) -> dict:
    n, k = w.shape
    wf = w.float().reshape(n, k // group, group)
    scale = (wf.abs().amax(-1, keepdim=True) / 7.0).clamp(min=1e-8).to(torch.bfloat16).float()
    q = (wf / scale).round().clamp(-8, 7).to(torch.int8).reshape(n, k)
    return {
        "weight_packed": pack_to_int32(q, 4, packed_dim=1),
        "weight_scale": scale.squeeze(-1).to(torch.bfloat16),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }


def ct_fp8(w: torch.Tensor) -> dict:
    scale = (w.float().abs().amax(-1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)  # [N, 1]
    return {"weight": (w.float() / scale).to(torch.float8_e4m3fn), "weight_scale": scale}


def _int4_asym(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group along K: (q [N, K] 0..15, scales [K/g, N], zeros [K/g, N])."""
    n, k = w.shape
    wf = w.float().reshape(n, k // group, group)
    lo, hi = wf.amin(-1), wf.amax(-1)  # [N, K/g]
    scale = ((hi - lo) / 15).clamp(min=1e-8).half().float()
    zero = (-lo / scale).round().clamp(0, 15)
    q = (wf / scale.unsqueeze(-1) + zero.unsqueeze(-1)).round().clamp(0, 15).reshape(n, k)
    return q.to(torch.int32), scale.t().contiguous(), zero.t().contiguous().to(torch.int32)


def _pack_rows(q: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
    """Pack 8 int4 values of dim -1 into one int32 (optionally in AWQ's interleaved order)."""
    *lead, m = q.shape
    q = q.reshape(*lead, m // 8, 8)
    if order is not None:
        q = q[..., order]
    out = torch.zeros(*lead, m // 8, dtype=torch.int64)
    for i in range(8):
        out |= (q[..., i].to(torch.int64) & 0xF) << (4 * i)
    return (out - (out >= 2**31).long() * 2**32).to(torch.int32)  # two's complement


def gptq(w: torch.Tensor, group: int) -> dict:
    q, scale, zero = _int4_asym(w, group)  # [N, K], [K/g, N], [K/g, N]
    return {
        "qweight": _pack_rows(q).t().contiguous(),  # [K/8, N], packed along K
        "qzeros": _pack_rows(zero - 1),  # GPTQ v1 stores zero - 1
        "scales": scale.half(),
        "g_idx": torch.arange(w.shape[1], dtype=torch.int32) // group,
    }


def awq(w: torch.Tensor, group: int) -> dict:
    q, scale, zero = _int4_asym(w, group)
    return {
        "qweight": _pack_rows(q.t().contiguous(), _AWQ_ORDER),  # [K, N/8]
        "qzeros": _pack_rows(zero, _AWQ_ORDER),  # [K/g, N/8]
        "scales": scale.half(),  # [K/g, N]
    }


def mxfp4(w: torch.Tensor) -> dict:
    """`w` [E, N, K] -> blocks [E, N, K/32, 16] uint8, scales [E, N, K/32] uint8 (E8M0)."""
    e, n, k = w.shape
    wf = w.float().reshape(e, n, k // 32, 32)
    amax = wf.abs().amax(-1).clamp(min=1e-12)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)  # [E, N, K/32]
    v = wf / torch.pow(2.0, exp).unsqueeze(-1)
    idx = (v.abs().unsqueeze(-1) - _FP4).abs().argmin(-1)  # [E, N, K/32, 32]
    code = (idx | ((v < 0) & (idx > 0)).long() << 3).to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return {"blocks": blocks.contiguous(), "scales": (exp + 127).to(torch.uint8)}


def _is_linear_weight(key: str, t: torch.Tensor) -> bool:
    skip = ("embed_tokens", "lm_head", "norm", ".gate.weight", "router", "shared_head", "eh_proj")
    return key.endswith(".weight") and t.dim() == 2 and not any(s in key for s in skip)


def write_quantized(
    src: Path,
    dst: Path,
    fmt: str,
    *,
    block: tuple[int, int] = (8, 8),
    group: int = 8,
    scale_dtype: torch.dtype = torch.float32,
    experts_only: bool | None = None,
) -> Path:
    """Write `src` (a tiny checkpoint folder) quantized as `fmt` into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    state = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(shard))
    config = json.loads((src / "config.json").read_text())
    only_experts = fmt != "fp8_block" if experts_only is None else experts_only
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if fmt == "mxfp4" and re.search(r"experts\.(gate_up|down)_proj$", key):
            enc = mxfp4(t.transpose(1, 2).contiguous())  # memory [E, K, N] -> [E, N, K]
            out[key + "_blocks"], out[key + "_scales"] = enc["blocks"], enc["scales"]
            continue
        if fmt == "mxfp4" or not _is_linear_weight(key, t):
            out[key] = t
            continue
        if only_experts and not _EXPERT.search(key):
            out[key] = t
            continue
        module = key.removesuffix(".weight")
        if fmt == "fp8_block":
            enc = fp8_block(t, block, scale_dtype)
        elif fmt == "ct_int4_pack":
            enc = ct_int4(t, group)
        elif fmt == "ct_fp8":
            enc = ct_fp8(t)
        elif fmt == "gptq":
            enc = gptq(t, group)
        elif fmt == "awq":
            enc = awq(t, group)
        else:
            raise ValueError(fmt)
        for comp, v in enc.items():
            out[f"{module}.{comp}"] = v.contiguous()
    config["quantization_config"] = quant_config(fmt, block, group)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():
        if extra.suffix in (".json", ".jinja", ".txt") and extra.name != "config.json":
            (dst / extra.name).write_bytes(extra.read_bytes())
    return dst


def quant_config(fmt: str, block: tuple[int, int], group: int) -> dict:
    if fmt == "fp8_block":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block),
        }
    if fmt == "mxfp4":
        return {
            "quant_method": "mxfp4",
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
        }
    if fmt in ("ct_int4_pack", "ct_fp8"):
        int4 = fmt == "ct_int4_pack"
        weights = (
            {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
            | {"group_size": group}
            if int4
            else {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
        )
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized" if int4 else "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": [
                        r"re:.*experts\.\d+\.(gate|up|down)_proj$",
                        r"re:.*experts\.\d+\.w[123]$",
                    ],
                    "weights": weights,
                    "input_activations": None,
                    "format": "pack-quantized" if int4 else "float-quantized",
                }
            },
            "ignore": ["lm_head"],
        }
    if fmt == "gptq":
        return {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group,
            "sym": False,
            "desc_act": False,
        }
    if fmt == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group,
            "version": "gemm",
            "zero_point": True,
        }
    raise ValueError(fmt)


def add_mtp(folder: Path, seed: int = 1) -> Path:
    """Append a DeepSeek-V3-style MTP layer (decoder layer N) to a tiny checkpoint in place."""
    config = json.loads((folder / "config.json").read_text())
    n = config["num_hidden_layers"]
    path = folder / "model.safetensors"
    state = load_file(path)
    g = torch.Generator().manual_seed(seed)
    last = f"model.layers.{n - 1}."
    hidden = config["hidden_size"]
    for key, t in list(state.items()):
        if key.startswith(last):
            new = f"model.layers.{n}." + key[len(last) :]
            if t.is_floating_point() and t.dtype.itemsize > 1 and "norm" not in key:
                t = (t.float() + 0.3 * torch.randn(t.shape, generator=g)).to(t.dtype)
            state[new] = t.clone()
    dt = state["model.embed_tokens.weight"].dtype
    extra = {
        "enorm.weight": torch.ones(hidden, dtype=dt),
        "hnorm.weight": torch.ones(hidden, dtype=dt),
        "eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=g).to(dt),
        "shared_head.norm.weight": torch.ones(hidden, dtype=dt),
        "shared_head.head.weight": state["lm_head.weight"].clone(),
        "embed_tokens.weight": state["model.embed_tokens.weight"].clone(),
    }
    for rel, t in extra.items():
        state[f"model.layers.{n}.{rel}"] = t
    save_file(state, path, metadata={"format": "pt"})
    config["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
