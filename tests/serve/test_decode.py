"""The batched decode loop: left-padded batches give each prompt exactly its own greedy output;
rows finish independently; stop strings, sampling, cancellation."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from premoe.demo.tasks import build_tokenizer
from premoe.serve.decode import BatchDecoder, DecodeRow, SamplingParams, TextStream
from tests.hub_tokenizers import CORPUS, hub_tokenizer
from tests.tiny import build_tiny

PROMPTS = ["12+345=", "kqzb>", "QDKAZZYXWVUT:", "#@#&|#?", "(["]


class Sink:
    def __init__(self, cancel_after: int | None = None) -> None:
        self.text = ""
        self.reason: str | None = None
        self.tokens = 0
        self.cancel_after = cancel_after
        self.deltas: list[str] = []

    @property
    def cancelled(self) -> bool:
        return self.cancel_after is not None and self.tokens >= self.cancel_after

    def on_delta(self, text: str, completion_tokens: int) -> None:
        self.text += text
        self.deltas.append(text)
        self.tokens = completion_tokens

    def on_finish(self, reason: str, completion_tokens: int) -> None:
        self.reason = reason
        self.tokens = completion_tokens


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    model = build_tiny("qwen3_moe", 3, vocab_size=128, max_position_embeddings=128)
    return model, build_tokenizer(128)


def reference(model: Any, tok: Any, prompt: str, n: int) -> tuple[str, int]:
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=n,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    new = out[0, enc["input_ids"].shape[1] :]
    return tok.decode(new, skip_special_tokens=True), len(new)


def run(
    dec: BatchDecoder, tok: Any, prompts: list[str], params: list[SamplingParams]
) -> list[Sink]:
    sinks = [Sink() for _ in prompts]
    rows = [
        DecodeRow(tok(p)["input_ids"], sp, s)
        for p, sp, s in zip(prompts, params, sinks, strict=True)
    ]
    dec.generate(rows)
    return sinks


@pytest.mark.parametrize(("cache", "pipelined"), [("dynamic", False), ("static", True)])
def test_greedy_batch_equals_each_prompt_alone(
    tiny: tuple[Any, Any], cache: str, pipelined: bool
) -> None:
    """Both cache modes, and both loops: plain, and pipelined (the next step is launched
    before the host reads this step's tokens, the CUDA default)."""
    model, tok = tiny
    dec = BatchDecoder(
        model,
        tok,
        max_batch=8,
        max_len=64,
        cache=cache,  # type: ignore[arg-type]
        pipelined=pipelined,
    )
    # different max_tokens per row: rows finish independently; 5 rows pad to the bucket of 8
    lengths = [8, 3, 12, 5, 10]
    sinks = run(dec, tok, PROMPTS, [SamplingParams(max_tokens=n) for n in lengths])
    for prompt, n, sink in zip(PROMPTS, lengths, sinks, strict=True):
        text, count = reference(model, tok, prompt, n)
        assert sink.text == text, prompt
        assert sink.tokens == count
        assert sink.reason == ("length" if count == n else "stop")
    assert dec.stats.batches == 1 and dec.stats.rows == 5
    # the same decoder runs the next batch from a clean cache
    again = run(dec, tok, PROMPTS[::-1], [SamplingParams(max_tokens=6)] * 5)
    for prompt, sink in zip(PROMPTS[::-1], again, strict=True):
        assert sink.text == reference(model, tok, prompt, 6)[0]


def test_context_window_is_enforced(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    dec = BatchDecoder(model, tok, max_batch=2, max_len=16, cache="static")
    with pytest.raises(ValueError, match="context window"):
        run(dec, tok, ["abcdefghij"], [SamplingParams(max_tokens=8)])
    with pytest.raises(ValueError, match="max_batch"):
        run(dec, tok, ["a", "b", "c"], [SamplingParams(max_tokens=2)] * 3)


def test_cancelled_row_stops_others_continue(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    dec = BatchDecoder(model, tok, max_batch=4, max_len=64, cache="static", pipelined=True)
    sinks = [Sink(cancel_after=2), Sink()]
    rows = [
        DecodeRow(tok(p)["input_ids"], SamplingParams(max_tokens=12), s)
        for p, s in zip(PROMPTS[:2], sinks, strict=True)
    ]
    dec.generate(rows)
    assert sinks[0].reason == "cancelled" and sinks[0].tokens == 2
    assert sinks[1].text == reference(model, tok, PROMPTS[1], 12)[0]


def test_sampling_seeded_and_top_p(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    dec = BatchDecoder(model, tok, max_batch=4, max_len=64)
    hot = SamplingParams(max_tokens=10, temperature=1.5, seed=11)
    a = run(dec, tok, [PROMPTS[0], PROMPTS[0]], [hot, hot])
    assert a[0].text == a[1].text  # same seed, same draw, even in one batch
    texts = {
        run(dec, tok, [PROMPTS[0]], [SamplingParams(max_tokens=10, temperature=1.5, seed=s)])[
            0
        ].text
        for s in range(4)
    }
    assert len(texts) > 1
    # a vanishing top_p keeps only the most likely token: greedy
    narrow = SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-9, seed=3)
    assert run(dec, tok, [PROMPTS[2]], [narrow])[0].text == reference(model, tok, PROMPTS[2], 10)[0]


def test_text_stream_stop_strings(tiny: tuple[Any, Any]) -> None:
    _, tok = tiny
    ids = tok("abcXYdef", add_special_tokens=False)["input_ids"]
    s = TextStream(tok, ["XYZ", "cX"], eos_ids={tok.eos_token_id})
    out = [s.push(i) for i in ids[:2]]
    assert out == ["a", "b"]
    out = s.push(ids[2])  # "c" could start "cX": held back
    assert out == "" and not s.finished
    assert s.push(ids[3]) == "" and s.finished  # "cX" found: text ends before it
    assert s.text == "ab" and s.finish_reason == "stop"

    s = TextStream(tok, ["XYZ"], eos_ids={tok.eos_token_id})
    emitted = "".join(s.push(i) for i in ids[:5])  # "abcXY": "XY" may become "XYZ"
    assert emitted == "abc"
    emitted += s.push(ids[5])  # "d": it did not
    assert emitted == "abcXYd"
    assert s.finish("length") == "" and s.text == "abcXYd"

    s = TextStream(tok, [], eos_ids={tok.eos_token_id})
    assert s.push(ids[0]) == "a"
    assert s.push(tok.eos_token_id) == "" and s.finish_reason == "stop"


# ---- incremental detokenization of hub-style tokenizers ----------------------------------------


@pytest.fixture(scope="module", params=["byte_level_bpe", "metaspace_byte_fallback", "demo"])
def a_tokenizer(request: pytest.FixtureRequest) -> Any:
    if request.param == "demo":
        return build_tokenizer(64)
    return hub_tokenizer(request.param)


def _streamed(tok: Any, ids: list[int], window: bool) -> tuple[str, list[str]]:
    s = TextStream(tok, [], eos_ids=set())
    if window:
        s._stream = None
    deltas = [s.push(i) for i in ids]
    deltas.append(s.finish("length"))
    return "".join(deltas), deltas


def test_streamed_text_equals_the_full_decode_for_hub_style_tokenizers(a_tokenizer: Any) -> None:
    tok = a_tokenizer
    assert TextStream(tok, [], set())._stream is not None  # the Rust path is taken
    rng = random.Random(0)
    alphabet = "".join(sorted(set("".join(CORPUS[:3]))))
    special = tok.all_special_ids[:1]
    texts = [
        *CORPUS[:3],
        *("".join(rng.choices(alphabet, k=rng.randint(1, 30))) for _ in range(40)),
    ]
    cases = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    cases += [ids[:3] + special + ids[3:] for ids in cases[:10]]  # a special token mid-stream
    # random ids: split characters, stray bytes (their text is all that is compared)
    cases += [rng.choices(range(len(tok)), k=rng.randint(1, 40)) for _ in range(100)]
    compared = 0
    for ids in cases:
        full = tok.decode(ids, skip_special_tokens=True)
        fast, deltas = _streamed(tok, ids, window=False)
        window = _streamed(tok, ids, window=True)[0]
        if "\ufffd" in full:  # invalid bytes: where a run splits changes the replacement chars
            continue
        assert fast == full, (ids, deltas)
        assert window == full
        compared += 1
    assert compared >= 50
    # a multi-byte character split over tokens is held back, not sent broken
    emoji = tok("🙂", add_special_tokens=False)["input_ids"]
    if len(emoji) > 1:
        s = TextStream(tok, [], eos_ids=set())
        assert [s.push(i) for i in emoji] == [""] * (len(emoji) - 1) + ["🙂"]


def test_a_tokenizer_that_cleans_up_spaces_decodes_in_python() -> None:
    tok = hub_tokenizer("byte_level_bpe")
    tok.clean_up_tokenization_spaces = True  # transformers edits the Rust text: not streamable
    assert TextStream(tok, [], set())._stream is None
