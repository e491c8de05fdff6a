"""Run by test_fused_router.py under Triton's CPU interpreter: `route_topk` against the routing
rule's reference for every scoring, and `FusedRouters` checked against tiny models' own routers
(the families whose rule the kernel expresses pass; the others keep their forward)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from premoe.arch.registry import arch_for_config
from premoe.arch.routing import RoutingRule, route_from_logits
from premoe.load import ResidentModel
from premoe.prune import KeepSets
from premoe.serve import fused_router, topk
from premoe.serve.rowmask import union_keep
from premoe.source import resolve_model
from tests.helpers import save_with_tokenizer, tiny_model


def kernel() -> None:
    g = torch.Generator().manual_seed(0)
    for scoring, selection, code in [("softmax", "scores", topk.SOFTMAX),
                                     ("sigmoid", "scores", topk.SIGMOID),
                                     ("softmax", "logits_topk", topk.TOPK_SOFTMAX)]:  # fmt: skip
        for renorm in (False, True):
            for t, e, k in [(1, 128, 8), (5, 60, 2), (3, 81, 8)]:
                rule = RoutingRule(scoring, selection, e, k, renorm, scaling=2.5)
                x = torch.randn(t, e, generator=g)
                w, idx = topk.route_topk(x, k, code, renorm, 2.5, torch.float32)
                want_w, want_idx = route_from_logits(x, rule)
                assert torch.equal(idx, want_idx), (scoring, selection, renorm, idx, want_idx)
                torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-6)
    x = torch.tensor([[0.5, 0.5, 0.1, 0.5, float("-inf"), 0.2]])  # ties: the lower index
    assert topk.route_topk(x, 3, topk.RAW, False, 1.0, torch.float32)[1].tolist() == [[0, 1, 3]]
    print("route_topk ok")


def specials() -> None:
    """The k-round selection on rows with ties, NaN, ±inf and ±0, k from 1 to 32 (powers of two
    or not), widths from 16 to 1000: the values and experts of a stable descending sort (NaN
    largest, -0.0 below 0.0, equal values by lower index), bit for bit (NaN as a NaN)."""
    g = torch.Generator().manual_seed(5)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 0.5, 0.5])
    for t, e, k in [(1, 16, 1), (2, 60, 6), (1, 81, 8), (3, 128, 8), (1, 128, 7),
                    (2, 256, 32), (1, 1000, 8), (2, 33, 2)]:  # fmt: skip
        x = torch.randn(t, e, generator=g)
        x[:, : e // 4] = torch.round(x[:, : e // 4])  # ties, -0.0 among them
        x[0, torch.randperm(e, generator=g)[: len(special)]] = special
        bits = x.view(torch.int32)
        order = torch.where(
            x.isnan(), torch.iinfo(torch.int32).max, bits ^ ((bits >> 31) & 0x7FFFFFFF)
        )
        want_idx = torch.sort(order, dim=-1, descending=True, stable=True).indices[:, :k]
        w, idx = topk.route_topk(x, k, topk.RAW, False, 1.0, torch.float32)
        assert torch.equal(idx, want_idx), (t, e, k, idx, want_idx)
        want = x.gather(1, want_idx)
        assert torch.equal(w.isnan(), want.isnan()), (t, e, k)  # a NaN of its own bits
        assert torch.equal(*(torch.where(v.isnan(), 0, v.view(torch.int32)) for v in (w, want)))
    print("specials ok")


def routers() -> None:
    for family in ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "gpt_oss", "deepseek_v3"):
        model = tiny_model(family).eval()
        arch = arch_for_config(model.config)
        fused = fused_router.FusedRouters(model, arch)
        why = fused_router.unsupported(arch, model.config)
        assert (why is None) == bool(fused.routers), (family, why, fused.why)
        if not fused.routers:
            print(f"{family} keeps its routers: {fused.why}")
            continue
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
        with torch.no_grad():
            want = model(input_ids=ids).logits
            with fused.patched():
                got = model(input_ids=ids).logits
        assert all("forward" not in r.__dict__ for r in fused.routers)  # restored
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        print(f"{family} fused ok")


def bf16_union(tmp: Path) -> None:
    """A bf16 model over a union of 76 of 128 experts, as serve holds it: its routers' bf16
    logits tie (the check must take tied experts in the kernel's order), and they are fused."""
    model = tiny_model("qwen3_moe", num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)
    src = resolve_model(str(save_with_tokenizer(model, tmp / "m")))
    g = torch.Generator().manual_seed(0)
    patterns = {
        f"p{i}": KeepSets.from_mapping(
            {n: torch.randperm(128, generator=g)[:32].tolist() for n in src.moe_layers}
        )
        for i in range(3)
    }
    union = union_keep(patterns, 128)
    assert union.count > 64, union.count
    resident = ResidentModel(src, union, device="cpu", dtype=torch.bfloat16).model.eval()
    fused = fused_router.FusedRouters(resident, arch_for_config(resident.config))
    assert fused.routers, fused.why
    print("bf16 union fused ok")


if __name__ == "__main__":
    kernel()
    specials()
    routers()
    with tempfile.TemporaryDirectory() as tmp:
        bf16_union(Path(tmp))
