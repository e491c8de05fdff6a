"""Exports have the layout serving engines (vLLM, SGLang) load: checked per family, on disk.

What an engine needs from a pruned checkpoint, and what is checked here for every registered
family (hub layout, bf16, 4 of 8 experts kept, different and non-contiguous per layer):

- **config.json** carries the (uniform) kept count under the key the engine's model file reads,
  and no alias of it still holding the old count; the config object transformers builds from it
  answers the engine's attribute with the kept count.
- **Tensors**: exactly the key set, shapes and dtypes that `save_pretrained` writes for a fresh
  model of the pruned config (nothing extra, nothing missing, nothing upcast); per-expert keys
  numbered 0..E'-1 in every MoE layer (the engines build their expert name lists from
  ``range(num_experts)``).

Engine sources read for this (public repositories, via the code search; vLLM was NOT run here):

- vLLM ``vllm/model_executor/models/qwen3_moe.py``: ``FusedMoE(num_experts=config.num_experts)``,
  ``get_expert_mapping`` -> ``FusedMoE.make_expert_params_mapping(ckpt_gate_proj_name="gate_proj",
  ckpt_down_proj_name="down_proj", ckpt_up_proj_name="up_proj",
  num_experts=config.num_experts)``, which yields ``experts.{expert_id}.{gate_proj|up_proj|
  down_proj}.`` for ``expert_id in range(num_experts)``; router ``mlp.gate``. SGLang
  ``python/sglang/srt/models/qwen3_moe.py`` reads ``config.num_experts`` as well.
- vLLM ``mixtral.py``: ``config.num_local_experts``; ``block_sparse_moe.experts.{e}.w1|w2|w3
  .weight`` for ``e in range(config.num_local_experts)``; router ``block_sparse_moe.gate``.
- vLLM ``deepseek_v2.py`` (DeepSeek-V2 and V3): ``make_expert_params_mapping(...,
  num_experts=config.n_routed_experts)`` with gate_proj/down_proj/up_proj; MTP layers
  (index >= ``num_hidden_layers``) are skipped.
- vLLM ``gpt_oss.py``: ``config.num_local_experts``; fused per-layer tensors with E first
  (suffixes ``.gate_up_proj``, ``.down_proj``, ``.gate_up_proj_bias``, ``.down_proj_bias`` in the
  unquantized path; ``*_blocks``/``*_scales`` for MXFP4); router ``mlp.router`` (weight, bias).

For the other families the engine key is assumed to be the Hugging Face config's own name (what
`ArchSpec.num_experts_key` holds), as published checkpoints use it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from premoe.export import export_pruned
from premoe.prune import KeepSets
from premoe.source import resolve_model
from tests.tiny import FAMILIES, arch_by_name, build_tiny

# expert-count key read by the engine's model file, where checked in the engine source
ENGINE_KEYS_CHECKED = {
    "qwen3_moe": "num_experts",
    "mixtral": "num_local_experts",
    "deepseek_v2": "n_routed_experts",
    "deepseek_v3": "n_routed_experts",
    "gpt_oss": "num_local_experts",
}
# 4 of 8 experts, different per layer, non-contiguous; 2 per group of 4 (exact for n_group=2)
KEEP = [[1, 2, 5, 6], [0, 3, 4, 7]]
DTYPE = torch.bfloat16


def engine_key(family: str) -> str:
    return ENGINE_KEYS_CHECKED.get(family, arch_by_name(family).num_experts_key)


def count_aliases(config: object, key: str) -> set[str]:
    """Names that mean the expert count in `config`'s class (attribute_map both ways)."""
    amap = dict(getattr(config, "attribute_map", {}) or {})
    names = {key, *(a for a, target in amap.items() if target == key)}
    if key in amap:
        names.add(amap[key])
    return names


def hub_checkpoint(family: str, folder: Path) -> Path:
    """A bf16 tiny checkpoint in the hub layout whose config.json names the expert count the
    way published checkpoints (and the engines) do: transformers 5 writes Qwen3-MoE's count as
    ``num_local_experts``, the hub's Qwen3 configs say ``num_experts``."""
    model = build_tiny(family).to(DTYPE)
    model.config.dtype = DTYPE
    model.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    key = engine_key(family)
    if key not in raw:
        alias = next(n for n in count_aliases(model.config, key) if n in raw)
        raw[key] = raw.pop(alias)
        (folder / "config.json").write_text(json.dumps(raw, indent=2))
    return folder


def tensor_table(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                dtype = getattr(
                    torch, {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}[t.get_dtype()]
                )
                out[key] = (tuple(t.get_shape()), dtype)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_export_has_the_engine_layout(family: str, tmp_path: Path) -> None:
    arch = arch_by_name(family)
    assert arch.num_experts_key == engine_key(family) or family not in ENGINE_KEYS_CHECKED, (
        "the registry's expert-count key differs from the one the engine reads"
    )
    src_dir = hub_checkpoint(family, tmp_path / "src")
    src = resolve_model(src_dir)
    keep = KeepSets.from_mapping({n: KEEP[i % 2] for i, n in enumerate(src.moe_layers)})
    out = tmp_path / "pruned"
    export_pruned(src, keep, out)
    src.close()
    key = engine_key(family)

    # config.json: the engine's key holds the uniform kept count; no alias keeps the old one
    raw = json.loads((out / "config.json").read_text())
    assert raw[key] == 4, raw
    cfg = AutoConfig.from_pretrained(out)
    for alias in count_aliases(cfg, key):
        assert raw.get(alias, 4) == 4, (alias, raw[alias])
    assert getattr(cfg, key) == 4 and arch.num_experts(cfg) == 4
    assert arch.moe_layer_ids(cfg) == arch.moe_layer_ids(src.config)

    # tensors: exactly what transformers writes for a fresh model of the pruned config
    exported = tensor_table(out)
    fresh_dir = tmp_path / "fresh"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(DTYPE).save_pretrained(fresh_dir)
    fresh = tensor_table(fresh_dir)
    assert set(exported) == set(fresh), set(exported) ^ set(fresh)
    for name, (shape, dtype) in fresh.items():
        assert exported[name] == (shape, dtype), (name, exported[name], (shape, dtype))

    # per-expert keys: experts 0..E'-1, contiguous, in every MoE layer
    if arch.per_expert_block is not None:
        pat = re.compile(rf"\.layers\.(\d+)\.{re.escape(arch.per_expert_block)}\.experts\.(\d+)\.")
        ids: dict[int, set[int]] = {}
        for name in exported:
            m = pat.search(name)
            if m:
                ids.setdefault(int(m[1]), set()).add(int(m[2]))
        if ids:  # per-expert layout on disk
            assert sorted(ids) == arch.moe_layer_ids(cfg)
            assert all(v == set(range(4)) for v in ids.values()), ids
