"""Routers' fused forwards (premoe.serve.fused_router, topk.route_topk): the kernel equals the
routing rule's reference for every scoring it expresses; a model's routers are fused only where
the check against their own forward passes, and the patched model computes what it did."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

from premoe.arch.registry import arch_for_config
from premoe.serve import fused_router, topk
from premoe.serve.continuous import decoder_layers
from premoe.serve.graphs import Regions
from tests.helpers import GPU, run_triton_script, tiny_model
from tests.serve.conftest import reference_route


def test_kernel_and_checks_under_the_interpreter() -> None:
    """route_topk against the reference (and on ties, NaN, ±inf, ±0 against a stable sort),
    FusedRouters against six families' own routers, run by Triton's CPU interpreter (needs
    `triton`)."""
    stdout = run_triton_script(Path(__file__).with_name("router_interpret_check.py"), 600)
    for check in ("route_topk", "specials"):
        assert f"{check} ok" in stdout, stdout
    for family in ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "gpt_oss"):
        assert f"{family} fused ok" in stdout, stdout
    assert "deepseek_v3 keeps its routers: the router has a selection-only correction bias" in (
        stdout
    )
    assert "bf16 union fused ok" in stdout, stdout


def test_the_check_takes_tied_experts_in_either_order() -> None:
    """bf16 logits tie often; torch.topk orders tied experts as it likes, the kernel by index.
    The check took that for a different routing, and the server's bf16 routers kept their own
    forward (three kernels a layer more on an H100)."""
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.5], [1.0, 1.0, 1.0, 0.0, 2.0]])  # [T, E]
    kernel = torch.tensor([[0, 2, 3], [4, 0, 1]])  # [T, k] ties by the lower index
    same = fused_router._same_choice
    assert same(torch.tensor([[0, 3, 2], [4, 1, 0]]), kernel, logits)
    assert same(torch.tensor([[0, 2, 3], [4, 2, 1]]), kernel, logits)  # 2 ties 0 and 1
    assert not same(torch.tensor([[0, 2, 1], [4, 0, 1]]), kernel, logits)  # 1 is not 3
    assert not same(torch.tensor([[0, 3, 2], [0, 4, 1]]), kernel, logits)  # out of order
    assert not same(torch.tensor([[0, 2, 5], [4, 0, 1]]), kernel, logits)  # no expert 5


def test_unsupported_rules_are_named() -> None:
    model = tiny_model("deepseek_v3")
    arch = arch_for_config(model.config)
    assert fused_router.unsupported(arch, model.config) == (
        "the router has a selection-only correction bias"
    )
    assert fused_router.for_model(model) is None  # CPU: no kernel, nothing fused


@GPU[0]
@GPU[1]
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_fused_routers_compiled_and_captured(family: str) -> None:
    if not topk.prepare(torch.device("cuda")):
        pytest.skip("Triton cannot run here")
    model = tiny_model(family).to("cuda", torch.bfloat16).eval()
    fused = fused_router.for_model(model)
    assert fused is not None and len(fused.routers) == model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (2, 7), device="cuda")
    router = fused.routers[0]
    x = torch.randn(5, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        own, want = router(x), model(input_ids=ids).logits
        with fused.patched():
            got = model(input_ids=ids).logits
            compiled = torch.compile(router)(x)
    for a, b in zip(own, compiled, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_routers_compile_once_for_every_layer(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled decoder layers (graphs.Regions: one dynamo cache for all layers) with the fused
    routers in place trace a handful of graphs over several shapes, not one per layer, with no
    graph break, and compute what the model's own forward does; afterwards the routers' classes
    have their own forward back. (A per-router forward object made dynamo recompile for every
    layer and hit its recompile limit: H100 363.5 against 491.2 tokens/s.)"""
    monkeypatch.setattr(topk, "route_topk", reference_route)
    model = tiny_model(family, num_hidden_layers=6).eval()
    fused = fused_router.FusedRouters(model, arch_for_config(model.config))
    assert fused.why is None and len(fused.routers) == 6
    own = type(fused.routers[0]).__dict__.get("forward")
    graphs: list[Any] = []

    def backend(gm: Any, example: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    regions = Regions(decoder_layers(model), backend=backend)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for rows, length in [(1, 5), (2, 7), (3, 4), (1, 9)]:
            ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=g)
            want = model(input_ids=ids, use_cache=False).logits
            with fused.patched(), regions.active():
                got = model(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert not breaks, breaks
    assert 0 < len(graphs) <= 3, len(graphs)  # per layer it would be 6 and more
    assert type(fused.routers[0]).__dict__.get("forward") is own


def test_compiled_layers_do_not_reuse_the_fused_forward_outside_the_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dynamo guards on the routers' class forward: layers compiled while it is patched are not
    replayed for a forward outside `patched()` (a prefill), and the other way round. The fused
    forward here doubles the weights, so a wrong reuse changes the logits."""

    def doubled(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        w, idx = reference_route(*args)
        return 2 * w, idx

    model = tiny_model("qwen3_moe", num_hidden_layers=3).eval()
    monkeypatch.setattr(topk, "route_topk", reference_route)
    fused = fused_router.FusedRouters(model, arch_for_config(model.config))
    assert fused.routers, fused.why
    monkeypatch.setattr(topk, "route_topk", doubled)
    torch._dynamo.reset()
    regions = Regions(decoder_layers(model), backend="eager")
    ids = torch.randint(
        0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        with fused.patched():
            want_fused = model(input_ids=ids, use_cache=False).logits
        assert not torch.allclose(want, want_fused)  # could fail: the doubling shows
        for patched in (True, False, True, False):
            with fused.patched() if patched else nullcontext(), regions.active():
                got = model(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(got, want_fused if patched else want)
