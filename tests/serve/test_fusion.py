"""Sibling projections fused into one matmul (premoe.serve.fusion), every family: the fused model
computes what the model did (logits, greedy text), adds no memory, keeps its parameter names and
never touches a router; the continuous decoder with fusion gives the unfused decoder's text."""

from __future__ import annotations

import pytest
import torch

from premoe.arch.registry import ARCHS
from premoe.serve.continuous import ContinuousDecoder
from premoe.serve.decode import SamplingParams
from premoe.serve.fusion import FusedLinear, find_groups, fuse_projections
from tests.helpers import tiny_model, tokenizer
from tests.serve.test_continuous import Sink


def _storage_bytes(model: torch.nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("family", [a.name for a in ARCHS])
def test_fused_model_computes_what_the_model_did(family: str) -> None:
    arch = next(a for a in ARCHS if a.name == family)
    model = tiny_model(family, seed=3).eval()
    ids = torch.tensor([[5, 9, 2, 7, 1, 4], [3, 3, 8, 6, 2, 2]])
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    names = dict(model.named_parameters())
    before = _storage_bytes(model)
    one = torch.zeros((1, 1), dtype=torch.long)
    groups = find_groups(model, lambda: model(input_ids=one, use_cache=False))
    assert groups, "nothing to fuse: the test could not fail"
    n = fuse_projections(model, lambda: model(input_ids=one, use_cache=False))
    assert n == sum(len(g) for g in groups)
    fused = {k for k, m in model.named_modules() if isinstance(m, FusedLinear)}
    assert len(fused) == n
    routers = {
        f"{arch.layers_prefix}.{layer}.{arch.router.module}"
        for layer in arch.moe_layer_ids(model.config)
    }
    assert not any(k.startswith(r) for k in fused for r in routers)
    assert dict(model.named_parameters()).keys() == names.keys()
    for k, p in model.named_parameters():
        assert torch.equal(p, names[k]), k
    assert _storage_bytes(model) <= before  # views of one weight: nothing added
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_member_called_on_another_input_computes_its_own() -> None:
    model = tiny_model("qwen3_moe", seed=1).eval()
    one = torch.zeros((1, 1), dtype=torch.long)
    fuse_projections(model, lambda: model(input_ids=one, use_cache=False))
    attn = model.model.layers[0].self_attn
    x, y = torch.randn(2, attn.q_proj.in_features), torch.randn(2, attn.q_proj.in_features)
    with torch.no_grad():
        q = attn.q_proj(x)
        k_other = attn.k_proj(y)  # not the head's input: its own matmul
        v = attn.v_proj(x)
    torch.testing.assert_close(q, x @ attn.q_proj.weight.T)
    torch.testing.assert_close(k_other, y @ attn.k_proj.weight.T)
    torch.testing.assert_close(v, x @ attn.v_proj.weight.T)


def test_decoder_with_fusion_gives_the_unfused_text() -> None:
    tok = tokenizer()
    prompts = [tok(t)["input_ids"] for t in ("12+34=", "abc>", "7*8=", "zyx")]
    texts = []
    for fuse in (False, True):
        model = tiny_model("qwen3_moe", seed=2).eval()
        dec = ContinuousDecoder(model, tok, slots=2, max_len=64, fuse=fuse)
        fused = any(isinstance(m, FusedLinear) for m in model.modules())
        assert fused == fuse
        sinks = [Sink() for _ in prompts]
        dec.run(
            [
                (s, p, SamplingParams(max_tokens=12), None)
                for s, p in zip(sinks, prompts, strict=True)
            ]
        )
        texts.append([s.text for s in sinks])
    assert texts[0] == texts[1]
    assert len(set(texts[0])) > 1
