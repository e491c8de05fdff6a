"""Quantized export round trip: quantize a tiny checkpoint's routed experts with `ExpertQuantizer`
into the hub layout, load it with plain transformers (which dequantizes on the CPU), and check

- the loaded expert weights equal `dequantize(...)` of what we wrote, bit for bit;
- every other tensor is untouched;
- the logits stay close to the unquantized model's (relative error reported and bounded).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from premoe.errors import UsageError
from premoe.quant.codecs import dequantize
from premoe.quant.export import ExpertQuantizer, quantized_bytes
from tests.tiny import build_tiny

pytest.importorskip("compressed_tensors")

log = logging.getLogger(__name__)

_EXPERT = re.compile(r"\.experts\.(\d+)\.")
# per-expert (gate, up, down) suffixes; the test reads the names, the library does not need them
_PROJ = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2"),
         "deepseek_v3": ("gate_proj", "up_proj", "down_proj")}  # fmt: skip
# relative logit error bounds (bf16 tiny random models; measured ~0.007 fp8, ~0.015 int4)
_BOUND = {"fp8": 0.03, "int4": 0.06}


def _tiny_bf16(family: str) -> torch.nn.Module:
    over = {"hidden_size": 64, "vocab_size": 128}
    over["intermediate_size" if family == "mixtral" else "moe_intermediate_size"] = 32
    return build_tiny(family, 0, **over).to(torch.bfloat16)


def _quantized_export(model: torch.nn.Module, folder: Path, q: ExpertQuantizer) -> dict:
    model.save_pretrained(folder / "src")
    sd: dict[str, torch.Tensor] = {}
    for f in sorted((folder / "src").glob("*.safetensors")):
        sd.update(load_file(f))
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        is_expert = bool(_EXPERT.search(key)) and key.endswith(".weight")
        out.update(q(key, t, expert_weight=is_expert))
    (folder / "q").mkdir()
    save_file(out, folder / "q" / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "src" / "config.json").read_text())
    cfg["quantization_config"] = q.quantization_config()
    (folder / "q" / "config.json").write_text(json.dumps(cfg))
    return {"source": sd, "written": out, "config": cfg["quantization_config"]}


def _parts(written: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in written.items() if k.startswith(prefix)}


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_quantized_export_loads_in_transformers(family: str, scheme: str, tmp_path: Path) -> None:
    model = _tiny_bf16(family)
    q = ExpertQuantizer(scheme, block=(32, 32), group_size=32)
    res = _quantized_export(model, tmp_path, q)
    fmt = "fp8_block" if scheme == "fp8" else "ct_int4_pack"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16).eval()

    # experts: the fused in-memory weights are our dequantization of what we wrote
    gate, up, down = _PROJ[family]
    sd_loaded = loaded.state_dict()
    checked = 0
    for name, t in sd_loaded.items():
        if not name.endswith("experts.gate_up_proj"):
            continue
        layer = name[: -len("gate_up_proj")]
        disk = (
            layer.replace(".mlp.experts.", ".block_sparse_moe.experts.")
            if family == "mixtral"
            else layer
        )
        if not any(k.startswith(disk) for k in res["written"]):
            disk = layer
        for e in range(t.shape[0]):

            def deq(proj: str, disk: str = disk, e: int = e) -> torch.Tensor:
                parts = _parts(res["written"], f"{disk}{e}.{proj}.")
                return dequantize(fmt, parts, res["config"], dtype=torch.bfloat16)

            assert torch.equal(t[e], torch.cat([deq(gate), deq(up)]))
            assert torch.equal(sd_loaded[layer + "down_proj"][e], deq(down))
            checked += 1
    assert checked > 0
    # everything else is what the source had
    for key, t in res["source"].items():
        if not _EXPERT.search(key):
            assert torch.equal(res["written"][key], t)

    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits.float()
        got = loaded(x).logits.float()
    rel = float((got - ref).norm() / ref.norm())
    log.info("%s %s: relative logit error %.4f; %s", family, scheme, rel, q.summary())
    assert rel < _BOUND[scheme]
    # bytes written for the experts match the size model plan uses
    shapes = [
        res["source"][k].shape for k in res["source"] if _EXPERT.search(k) and k.endswith(".weight")
    ]
    expect = sum(quantized_bytes(r, c, scheme, block=(32, 32), group_size=32) for r, c in shapes)
    assert q.bytes_out == expect


def test_quantizer_errors() -> None:
    with pytest.raises(UsageError, match="unknown quantization scheme"):
        ExpertQuantizer("nf4")  # type: ignore[arg-type]
    q = ExpertQuantizer("fp8", block=(128, 128))
    with pytest.raises(UsageError, match="does not divide"):
        q("m.experts.0.w1.weight", torch.randn(64, 64), expert_weight=True)
    with pytest.raises(UsageError, match="fused"):
        q("m.experts.gate_up_proj", torch.randn(4, 64, 64), expert_weight=True)
    with pytest.raises(UsageError, match="does not divide"):
        ExpertQuantizer("int4", group_size=48)(
            "a.experts.0.w.weight", torch.randn(8, 64), expert_weight=True
        )
    with pytest.raises(UsageError, match="nothing"):
        ExpertQuantizer("int4").quantization_config()
    # non-expert tensors pass through untouched
    t = torch.randn(4, 4)
    assert ExpertQuantizer("fp8")("lm_head.weight", t, expert_weight=False)["lm_head.weight"] is t
