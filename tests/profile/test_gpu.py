"""GPU checks of the profiler (run with `pytest -m gpu` on a CUDA machine)."""

from __future__ import annotations

from pathlib import Path

import torch

from premoe.profile import profile
from premoe.profile.hooks import mean_router_input, sample_tcess
from premoe.profile.metrics import (
    RoutingRule,
    decode_router_output,
    scatter_rows,
    token_contributions,
)
from tests.helpers import GPU, random_texts, tiny_model, tokenizer, write_texts

pytestmark = GPU


def test_hook_math_never_syncs() -> None:
    """Everything a router hook computes runs with CUDA sync debugging set to 'error'."""
    dev = torch.device("cuda")
    b, s, h, e, k = 4, 16, 32, 8, 2
    rule = RoutingRule("softmax", "scores", e, k, True)
    logits = torch.randn(b * s, e, device=dev)
    w, idx = (
        torch.randn(b * s, k, device=dev).softmax(-1),
        torch.randint(0, e, (b * s, k), device=dev),
    )
    mask = torch.ones(b, s, device=dev)
    mask[1, 5:] = 0
    acc = torch.zeros(4, e, dtype=torch.float64, device=dev)
    x = torch.randn(b, s, h, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        routing = decode_router_output((logits, w, idx), rule)
        rows = ("counts", "tcess", "paper-logits")
        c = token_contributions(routing, mask.reshape(-1), rule, rows, 0.3)
        scatter_rows(acc[:3], c, routing.indices)
        sample_tcess(routing, mask, rule, 0.3)
        mean_router_input(x, mask)
        bare = decode_router_output(logits, rule)  # recomputed routing
        token_contributions(bare, mask.reshape(-1), rule, ("tcess",), 0.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_equals_cpu(tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe")
    corpus = write_texts(tmp_path / "c.jsonl", random_texts(9, seed=4))
    metrics = ["tcess", "frequency", "paper-logits", "reap"]
    cpu = profile(model, {"t": corpus}, tokenizer=tokenizer(), metrics=metrics, batch_size=4)
    gpu = profile(
        model.to("cuda"), {"t": corpus}, tokenizer=tokenizer(), metrics=metrics, batch_size=4
    )
    for m in metrics:
        assert (cpu.scores("t", m) - gpu.scores("t", m)).abs().max().item() <= 1e-4, m
