"""The profiler's metrics against an independent, token-by-token computation.

The reference below takes each MoE layer's router input from an unpadded run of each text
alone, recomputes the router logits from the router weights, applies the family's routing rule
in plain Python (written here from the transformers source, not from premoe), and sums TCESS,
frequency and paper-logits expert by expert. The profiler runs the same texts in padded batches.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from premoe.arch import arch_for_config
from premoe.errors import UnsupportedArchitectureError
from premoe.profile import profile
from premoe.profile.hooks import router_module
from premoe.profile.metrics import RoutingRule, decode_router_output, route_from_logits
from tests.helpers import random_texts, tiny_model, tokenizer, write_texts
from tests.tiny import FAMILIES


def _router_inputs(model, arch, ids: list[int]) -> dict[int, torch.Tensor]:
    """{MoE layer: router input [S, H]} of one unpadded sequence."""
    got: dict[int, torch.Tensor] = {}
    handles = []
    for layer in arch.moe_layer_ids(model.config):

        def pre(mod, args, layer=layer):
            got[layer] = args[0].reshape(-1, args[0].shape[-1]).detach().double()

        handles.append(router_module(model, arch, layer).register_forward_pre_hook(pre))
    with torch.no_grad():
        model.model(input_ids=torch.tensor([ids]), use_cache=False)
    for h in handles:
        h.remove()
    return got


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    ex = [math.exp(x - m) for x in xs]
    s = sum(ex)
    return [x / s for x in ex]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _top(values: list[float], k: int, among: list[int] | None = None) -> list[int]:
    cand = among if among is not None else list(range(len(values)))
    return sorted(cand, key=lambda e: -values[e])[:k]


def _route_token(family: str, config, logits: list[float], bias: list[float] | None):
    """(selected experts, weights, p) for one token by the family's rule (from the HF source)."""
    k = config.num_experts_per_tok
    if family == "qwen3_moe":  # softmax -> top-k -> optional renormalise
        p = _softmax(logits)
        sel = _top(p, k)
        w = [p[e] for e in sel]
        if config.norm_topk_prob:
            w = [x / sum(w) for x in w]
        return sel, w, p
    if family == "deepseek_v3":  # sigmoid; select on sigmoid + bias, group-limited
        p = [_sigmoid(x) for x in logits]
        choice = [p[e] + bias[e] for e in range(len(p))]
        n_group, size = config.n_group, len(p) // config.n_group
        group_score = []
        for g in range(n_group):
            members = sorted((choice[e] for e in range(g * size, (g + 1) * size)), reverse=True)
            group_score.append(members[0] + members[1])
        groups = sorted(range(n_group), key=lambda g: -group_score[g])[: config.topk_group]
        allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
        sel = _top(choice, k, allowed)
        w = [p[e] for e in sel]
        if config.norm_topk_prob:
            w = [x / (sum(w) + 1e-20) for x in w]
        w = [x * config.routed_scaling_factor for x in w]
        return sel, w, p
    if family == "gpt_oss":  # top-k logits -> softmax over the k
        sel = _top(logits, k)
        w = _softmax([logits[e] for e in sel])
        return sel, w, _softmax(logits)
    raise AssertionError(family)


def reference_scores(model, family: str, texts: list[str], threshold: float) -> dict:
    arch = arch_for_config(model.config)
    tok = tokenizer()
    layers = arch.moe_layer_ids(model.config)
    e = arch.num_experts(model.config)
    k = arch.top_k(model.config)
    out = {m: [[0.0] * e for _ in layers] for m in ("tcess", "counts", "paper-logits")}
    tokens = 0
    for text in texts:
        ids = tok(text)["input_ids"]
        tokens += len(ids)
        inputs = _router_inputs(model, arch, ids)
        for row, layer in enumerate(layers):
            router = router_module(model, arch, layer)
            bias = getattr(router, "bias", None)
            logits = F.linear(
                inputs[layer], router.weight.double(), None if bias is None else bias.double()
            )
            corr = getattr(router, "e_score_correction_bias", None)
            corr_list = corr.double().tolist() if corr is not None else None
            for t in range(logits.shape[0]):
                lt = logits[t].tolist()
                sel, w, p = _route_token(family, model.config, lt, corr_list)
                pmax = max(p)
                for e_, w_ in zip(sel, w, strict=True):
                    out["counts"][row][e_] += 1.0
                    if p[e_] >= threshold * pmax:
                        out["tcess"][row][e_] += w_
                top1 = sel[max(range(k), key=lambda i: w[i])]
                out["paper-logits"][row][top1] += lt[top1]
    return {
        "tcess": torch.tensor(out["tcess"], dtype=torch.float64) / tokens,
        "frequency": torch.tensor(out["counts"], dtype=torch.float64) / (tokens * k),
        "paper-logits": torch.tensor(out["paper-logits"], dtype=torch.float64) / tokens,
        "tokens": tokens,
    }


@pytest.mark.parametrize("threshold", [0.0, 0.3])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_tcess_matches_token_by_token_reference(family, threshold, tmp_path: Path) -> None:
    model = tiny_model(family)
    texts = random_texts(7, seed=1)
    corpus = write_texts(tmp_path / "c.jsonl", texts)
    metrics = ["tcess", "frequency", "paper-logits"]
    store = profile(
        model,
        {"t": corpus},
        tokenizer=tokenizer(),
        metrics=metrics,
        threshold=threshold,
        batch_size=3,
    )
    ref = reference_scores(model, family, texts, threshold)
    assert store.tasks["t"].tokens == ref["tokens"]
    for m in metrics:
        got = store.scores("t", m).double()
        assert got.shape == ref[m].shape
        assert (got - ref[m]).abs().max().item() <= 1e-5, m
    assert torch.allclose(store.scores("t", "frequency").sum(-1), torch.ones(1))
    if threshold > 0:  # the threshold must matter on these routers (so the test can fail)
        loose = reference_scores(model, family, texts, 0.0)["tcess"]
        assert (loose - ref["tcess"]).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_routing_equals_the_router(family) -> None:
    """route_from_logits (used where a router returns only logits) = the model's own routing."""
    torch.manual_seed(0)
    model = tiny_model(family)
    arch = arch_for_config(model.config)
    rule = RoutingRule.from_arch(arch, model.config)
    layer = arch.moe_layer_ids(model.config)[0]
    seen = {}
    router = router_module(model, arch, layer)
    h = router.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    with torch.no_grad():
        model.model(input_ids=torch.randint(4, 100, (2, 11)), use_cache=False)
    h.remove()
    from premoe.profile.hooks import correction_bias

    bias = correction_bias(model, arch, layer)
    decoded = decode_router_output(seen["out"], rule, bias)
    w, idx = route_from_logits(decoded.logits, rule, bias)
    order_a, order_b = decoded.indices.argsort(-1), idx.argsort(-1)
    assert torch.equal(decoded.indices.gather(1, order_a), idx.gather(1, order_b))
    assert torch.allclose(decoded.weights.gather(1, order_a), w.gather(1, order_b), atol=1e-6)
    # the other conventions (GraniteMoe 5.17: (indices, weights, logits); Jamba 5.17: a bare
    # nn.Linear; Llama 4: (scores, logits)) decode to the same routing
    logits, weights, indices = decoded.logits, decoded.weights, decoded.indices
    granite = decode_router_output((indices, weights, logits), rule, bias)
    assert torch.equal(granite.indices, indices) and torch.equal(granite.logits, logits)
    for out in (logits, (torch.zeros_like(logits), logits)):
        other = decode_router_output(out, rule, bias)
        assert torch.equal(other.indices.sort(-1)[0], indices.sort(-1)[0])


def test_padding_never_counts(tmp_path: Path) -> None:
    """One text alone, or batched with longer texts, gives the same sums and the same keys."""
    model = tiny_model("qwen3_moe")
    tok = tokenizer()
    short, *longer = ["ab+1=", *random_texts(3, seed=5, lo=30, hi=40)]
    alone = profile(model, {"t": write_texts(tmp_path / "a.jsonl", [short])}, tokenizer=tok)
    both = profile(
        model,
        {"t": write_texts(tmp_path / "b.jsonl", [short, *longer]), "u": tmp_path / "b.jsonl"},
        tokenizer=tok,
        batch_size=4,
    )
    one_by_one = profile(model, {"t": tmp_path / "b.jsonl"}, tokenizer=tok, batch_size=1)
    for kind in ("router_input", "tcess"):
        a = alone.keys("t", kind)[0]
        b = both.keys("t", kind)[0]  # keys are in corpus order: the short text is row 0
        assert abs(a - b).max() <= 1e-5, kind
    sums_b, sums_1 = both.sums("t"), one_by_one.sums("t")
    for row in sums_b:
        assert (sums_b[row] - sums_1[row]).abs().max().item() <= 1e-5
    assert both.tasks["t"].tokens == sum(len(tok(t)["input_ids"]) for t in [short, *longer])
    assert sums_b["counts"].sum().item() == both.tasks["t"].tokens * 2 * 2  # K=2, 2 layers


def test_reap_is_weight_times_expert_output_norm(tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe")
    arch = arch_for_config(model.config)
    texts = random_texts(4, seed=2)
    store = profile(
        model,
        {"t": write_texts(tmp_path / "c.jsonl", texts)},
        tokenizer=tokenizer(),
        metrics=["reap", "frequency"],
        batch_size=2,
    )
    rule = RoutingRule.from_arch(arch, model.config)
    layers = arch.moe_layer_ids(model.config)
    sums = torch.zeros(len(layers), rule.num_experts, dtype=torch.float64)
    counts = torch.zeros_like(sums)
    tok = tokenizer()
    for text in texts:
        inputs = _router_inputs(model, arch, tok(text)["input_ids"])
        for row, layer in enumerate(layers):
            _reap_layer(model, layer, inputs[layer], sums[row], counts[row])
    ref = sums / counts.clamp(min=1)
    assert (store.scores("t", "reap").double() - ref).abs().max().item() <= 1e-5


@torch.no_grad()
def _reap_layer(model, layer, x, sums, counts) -> None:
    """Σ w · ‖f_e(x_t)‖ per expert, f_e from the fused weights (SwiGLU), one (t, k) at a time."""
    block = model.model.layers[layer].mlp
    x = x.float()
    _, w, idx = block.gate(x)
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    inter = down.shape[-1]
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            gu = gate_up[e] @ x[t]
            f = down[e] @ (F.silu(gu[:inter]) * gu[inter:])
            sums[e] += float(w[t, j]) * float(f.norm())
            counts[e] += 1


def test_reap_refused_where_experts_run_densely(tmp_path: Path) -> None:
    model = tiny_model("llama4_text")
    corpus = write_texts(tmp_path / "c.jsonl", random_texts(2, seed=3))
    with pytest.raises(UnsupportedArchitectureError, match="reap"):
        profile(model, {"t": corpus}, tokenizer=tokenizer(), metrics=["reap"])
    # tcess works there (Llama 4's router returns (scores, logits): recomputed routing)
    store = profile(model, {"t": corpus}, tokenizer=tokenizer(), metrics=["tcess", "frequency"])
    assert torch.allclose(store.scores("t", "frequency").sum(-1), torch.ones(1))
