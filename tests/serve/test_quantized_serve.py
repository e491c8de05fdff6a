"""`premoe serve --quantize`: the engine keeps the experts quantized on the device (mixed patterns
through per-row masks, or swaps of quantized slots), and every request gets its pattern's
greedy output from the quantized pruned model."""

from __future__ import annotations

import asyncio

import pytest
import torch

from premoe.load import load_pruned
from premoe.load.loader import ExpertQuantization
from premoe.serve import Engine, EngineConfig, SamplingParams
from tests.serve.conftest import KEEP, ServeWorld
from tests.serve.test_engine import collect, router

QUANT = ExpertQuantization("int4", block=(8, 8), group_size=8)


@pytest.mark.parametrize("mixed", ["auto", "off"])
def test_quantized_engine_serves_each_pattern_exactly(serve_world: ServeWorld, mixed) -> None:
    cfg = EngineConfig(
        model=str(serve_world.model),
        store=str(serve_world.store),
        keep=KEEP,
        device="cpu",
        dtype="fp32",
        max_batch=3,
        max_wait_ms=10,
        mixed=mixed,
        quantize=QUANT,
    )
    eng = Engine(cfg, router=router)
    eng.start()
    try:
        prompts = ["12+3=", "abc>", "7+70=", "zz>"]

        async def run():
            reqs = [
                eng.submit(eng.encode_prompt(p), p, SamplingParams(max_tokens=5)) for p in prompts
            ]
            return reqs, await asyncio.gather(*(collect(r) for r in reqs))

        reqs, outs = asyncio.run(run())
        for req, (text, reason) in zip(reqs, outs, strict=True):
            assert reason in ("stop", "length"), reason
            ref = load_pruned(
                serve_world.model, eng.patterns[req.task], dtype=torch.float32, quantize=QUANT
            )
            ids = torch.tensor([eng.encode_prompt(req.prompt_text)])
            with torch.no_grad():
                out = ref.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=5,
                    pad_token_id=0,
                )
            expected = serve_world.tokenizer.decode(
                out[0, ids.shape[1] :], skip_special_tokens=True
            )
            assert text == expected[: len(text)] and len(text) > 0
    finally:
        eng.stop()
