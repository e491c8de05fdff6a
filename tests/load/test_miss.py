"""Dropped mass (`premoe.load.miss`): definition, both logit sources, accumulation, demo figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import premoe.load.miss as miss
from premoe.demo.tasks import generate as task_rows
from premoe.demo.tasks import task_names
from premoe.load import ResidentModel, load_pruned
from premoe.load.decode import decode
from premoe.load.fetch import FetchingModel
from premoe.load.miss import MassAccumulator, shadow_meter
from premoe.patterns import PatternStore
from premoe.policy import select_experts
from premoe.profile.metrics import RoutingRule, route_from_logits
from premoe.prune import KeepSets
from premoe.source import load_tokenizer, resolve_model
from tests.helpers import save_with_tokenizer, tiny_model

DEMO = Path(__file__).resolve().parents[2] / "premoe" / "demo" / "model"
DEMO_STORE = Path(__file__).resolve().parents[2] / "patterns" / "demo"
IDS = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def tiny(request, tmp_path_factory: pytest.TempPathFactory):
    folder = save_with_tokenizer(tiny_model(request.param), tmp_path_factory.mktemp("miss"))
    return resolve_model(folder)


def _measure(meter, model, ids=IDS, mask=None) -> MassAccumulator:
    acc = MassAccumulator(len(meter.layers), ids.shape[0])
    with meter, torch.no_grad():
        meter.target = acc
        model(input_ids=ids, attention_mask=mask)
    return acc


def _reference_first_layer(src, keep: KeepSets, ids: torch.Tensor) -> torch.Tensor:
    """Dropped mass [B, S] at the first MoE layer, from the full model's router input (equal in
    the pruned model: no expert runs before it), with the meter's rule: top-k of the scores
    plus the correction bias, no groups."""
    full = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32).eval()
    layer = src.moe_layers[0]
    router = full.model.layers[layer].get_submodule(src.arch.router.module)
    seen = {}
    handle = router.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        full(ids)
    handle.remove()
    x = seen["x"].reshape(-1, seen["x"].shape[-1])
    w_full = src.reader.get(src.keymap.router_key(layer, "weight")).float()
    rule = RoutingRule.from_arch(src.arch, src.config)
    rule = RoutingRule(rule.scoring, rule.selection, rule.num_experts, rule.top_k, False)
    bias = None
    if src.arch.correction_bias is not None:
        bias = src.reader.get(src.keymap.router_key(layer, "correction_bias")).float()
    logits = x.float() @ w_full.T
    w, idx = route_from_logits(logits, rule, bias)
    nonres = torch.ones(src.num_experts)
    nonres[list(keep.layers[layer])] = 0.0
    return ((w * nonres[idx]).sum(-1) / w.sum(-1)).view(ids.shape)


def test_every_expert_resident_drops_nothing(tiny) -> None:
    keep = KeepSets.uniform(tiny.moe_layers, range(tiny.num_experts))
    net = load_pruned(tiny, keep)
    acc = _measure(shadow_meter(net, tiny, keep.layers), net)
    for row in (0, 1):
        s = acc.summary(row)
        assert s.tokens == IDS.shape[1] and s.mean == 0.0 and s.max_layer == 0.0


@pytest.mark.parametrize("batched", [True, False])
def test_shadow_meter_equals_the_full_routers_choice(tiny, batched, monkeypatch) -> None:
    monkeypatch.setattr(miss, "BATCH_TOKENS", 64 if batched else 0)
    keep = KeepSets.uniform(tiny.moe_layers, [0, 3, 5])
    net = load_pruned(tiny, keep)
    acc = _measure(shadow_meter(net, tiny, keep.layers), net)
    ref = _reference_first_layer(tiny, keep, IDS)  # [B, S]
    for row in (0, 1):
        got = acc.summary(row)
        assert got.per_layer[0] == pytest.approx(ref[row].mean().item(), abs=1e-5)
        assert 0.0 < got.mean <= got.max <= got.max_layer <= 1.0


def test_router_meter_reads_the_full_routing_and_follows_fetches(tiny) -> None:
    keep = KeepSets.uniform(tiny.moe_layers, [0, 3])
    with FetchingModel(tiny, keep) as fm:
        meter = fm.meter()
        acc = _measure(meter, fm.model)
        ref = _reference_first_layer(tiny, keep, IDS)
        if tiny.arch.router.grouped:  # the router's own choice is group-limited
            assert 0.0 < acc.summary(0).per_layer[0] <= 1.0
        else:
            assert acc.summary(0).per_layer[0] == pytest.approx(ref[0].mean().item(), abs=1e-5)
        resident = fm.resident  # changed by the fetches
        assert resident != {n: [0, 3] for n in tiny.moe_layers}
        for i, layer in enumerate(meter.layers):
            want = torch.ones(tiny.num_experts)
            want[resident[layer]] = 0.0
            assert torch.equal(meter.nonresident[i], want)


def test_accumulator_masks_padding_windows_and_resets() -> None:
    acc = MassAccumulator(2, rows=2, tail=2)
    d = torch.tensor([[[0.1, 0.2, 0.3], [0.5, 0.5, 0.9]], [[0.3, 0.2, 0.1], [0.5, 0.5, 0.9]]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])  # row 1: left padding
    acc.add(d, mask)  # d: [L=2, B=2, S=3]
    s0, s1 = acc.summary(0), acc.summary(1)
    assert s0.tokens == 3 and s1.tokens == 2
    assert s0.per_layer == pytest.approx([0.2, 0.2])
    assert s1.per_layer == pytest.approx([0.7, 0.7])
    assert s0.max == pytest.approx(0.2) and s1.max == pytest.approx(0.9)
    assert s1.max_layer == pytest.approx(0.9)
    assert acc.window() == pytest.approx([0.2, 0.7])  # the last 2 tokens of each row
    assert acc.window() == [0.0, 0.0]
    acc.reset(1)
    assert acc.summary(1).tokens == 0 and acc.summary(0).tokens == 3


def _demo_keep(store: PatternStore, src, task: str, k: int) -> KeepSets:
    return select_experts(
        store.scores(task, "tcess"),
        src.moe_layers,
        num_experts=src.num_experts,
        routed=src.top_k,
        keep=k,
    ).keep


def test_demo_in_task_near_zero_out_of_task_high() -> None:
    """Generous keep (48 of 64): in-task prompts drop < 1 % of the routed weight; prompts of
    the other tasks drop many times more."""
    src = resolve_model(DEMO)
    store = PatternStore.load(DEMO_STORE)
    tok = load_tokenizer(DEMO)
    tasks = task_names()
    first = _demo_keep(store, src, tasks[0], 48)
    net = load_pruned(src, first, dtype=torch.float32)
    resident = ResidentModel.wrap(net, src, first)
    means: dict[tuple[str, str], float] = {}
    for pattern in tasks:
        keep = _demo_keep(store, src, pattern, 48)
        resident.swap_to(keep)
        meter = shadow_meter(net, src, keep.layers)
        with meter:
            for task in tasks:
                got = []
                for row in task_rows(task, 3, seed=11):
                    d = decode(net, tok(row["prompt"])["input_ids"], max_new_tokens=1, meter=meter)
                    assert d.prompt_mass is not None
                    got.append(d.prompt_mass.mean)
                means[(pattern, task)] = sum(got) / len(got)
    in_task = [means[(t, t)] for t in tasks]
    out_task = [means[(p, t)] for p in tasks for t in tasks if p != t]
    assert max(in_task) < 0.01
    assert sum(out_task) / len(out_task) > 10 * (sum(in_task) / len(in_task))
