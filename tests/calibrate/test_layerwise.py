"""Layer-sequential recalibration streamed from the checkpoint (one decoder layer materialised at
a time) gives the resident path's routers; bad input is a clear UsageError."""

from __future__ import annotations

import pytest
import torch

from premoe.calibrate.layerwise import LayerwiseOptions, recalibrate_layerwise
from premoe.calibrate.recalibrate import batches
from premoe.errors import UsageError
from premoe.profile.weights import CheckpointWeights
from premoe.prune import KeepSets
from premoe.source import resolve_model
from tests.helpers import random_texts, tokenizer

OPTS = LayerwiseOptions(steps=15, lr=5e-2)
KEEP = {"qwen3_moe": [0, 2, 3, 5], "deepseek_v3": [0, 1, 4, 5]}  # (DeepSeek: 2 per group)


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    tok = tokenizer()
    return batches([tok(t)["input_ids"] for t in random_texts(8, 3)], 3, 0)


def _keep(folder) -> KeepSets:
    src = resolve_model(folder)
    kept = KEEP[src.arch.name]
    layers = src.moe_layers
    src.close()
    return KeepSets.from_mapping({layer: kept for layer in layers})


def _real(module: torch.nn.Module) -> bool:
    return all(p.device.type != "meta" for p in module.parameters())


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_streamed_equals_resident(family: str, tiny_dir) -> None:
    from transformers import AutoModelForCausalLM

    folder = tiny_dir(family)
    keep, data = _keep(folder), _data()
    src = resolve_model(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    resident = recalibrate_layerwise(model, src.arch, keep, data, options=OPTS)
    streamed = recalibrate_layerwise(folder, None, keep, data, options=OPTS, dtype="fp32")
    assert not resident.info["streamed"] and streamed.info["streamed"]
    assert set(streamed.tensors) == set(resident.tensors) == set(src.moe_layers)
    for layer, by_role in resident.tensors.items():
        assert set(streamed.tensors[layer]) == set(by_role)
        for role, t in by_role.items():
            torch.testing.assert_close(streamed.tensors[layer][role], t, rtol=1e-5, atol=1e-6)
        # not trivially equal: the routers were trained away from the source rows
        source = model.model.layers[layer].get_parameter(src.arch.router_weight.memory)
        assert not torch.allclose(by_role["weight"], source[list(keep.layers[layer])].float())
    assert streamed.info["layers"].keys() == resident.info["layers"].keys()
    src.close()


def test_streamed_holds_one_decoder_layer_at_a_time(tiny_dir) -> None:
    """Whenever a decoder layer (or its experts, run on their own) computes, it is the only
    layer with real tensors and the embeddings are meta again; everything is released at the
    end. The weights object is the caller's and stays usable."""
    folder = tiny_dir("deepseek_v3")  # 3 layers: dense, MoE, MoE
    keep = _keep(folder)
    data = _data()
    src = resolve_model(folder)
    weights = CheckpointWeights(src, torch.device("cpu"), "fp32")
    layers = weights.model.model.layers
    seen: list[tuple[str, int, list[int], bool]] = []

    def pre(what: str, index: int) -> None:
        loaded = [i for i, layer in enumerate(layers) if _real(layer)]
        seen.append((what, index, loaded, _real(weights.model.model.embed_tokens)))

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: pre("layer", i))
        if i in keep.layers:
            experts = layer.get_submodule(src.arch.experts[0].memory.rsplit(".", 1)[0])
            experts.register_forward_pre_hook(lambda m, a, i=i: pre("experts", i))
    done: list[tuple[int, int]] = []
    routers = recalibrate_layerwise(
        weights, src.arch, keep, data, options=OPTS, progress=lambda d, n: done.append((d, n))
    )
    n = len(data)
    # dense layer 0: one replay; MoE layers: fit replay, kept experts, recalibrated replay
    assert [s[1] for s in seen if s[0] == "layer"] == [0] * n + [1] * 2 * n + [2] * 2 * n
    assert {s[1] for s in seen if s[0] == "experts"} == {1, 2}
    assert all(loaded == [index] for _, index, loaded, _ in seen)
    assert not any(embed for *_, embed in seen)
    assert not any(_real(layer) for layer in layers)  # everything released at the end
    assert done == [(1, 2), (2, 2)]
    assert set(routers.tensors) == {1, 2}
    weights.close()
    src.close()


@pytest.mark.parametrize("empty", ["no batches", "no tokens"])
def test_empty_data_is_a_usage_error(empty: str, tiny_dir) -> None:
    folder = tiny_dir("qwen3_moe")
    keep = _keep(folder)
    if empty == "no batches":
        data: list[tuple[torch.Tensor, torch.Tensor]] = []
    else:
        ids = torch.zeros((2, 4), dtype=torch.long)
        data = [(ids, torch.zeros_like(ids))]
    with pytest.raises(UsageError, match="at least one token"):
        recalibrate_layerwise(folder, None, keep, data, options=OPTS)
    with pytest.raises(UsageError, match="at least one MoE layer"):
        recalibrate_layerwise(folder, None, KeepSets.from_mapping({}), _data(), options=OPTS)
