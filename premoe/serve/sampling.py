"""Choosing the next token of a row from its logits, as vLLM does where OpenAI's spec is silent.

Order (vLLM v1's sampler): penalties on the raw logits (repetition over prompt and output tokens:
positive logits divided by it, negative ones multiplied; frequency: minus penalty x count of the
token in the output; presence: minus penalty if it occurs in the output), then greedy (argmax) at
temperature 0, else temperature, min_p (drop tokens whose probability is below min_p x the top
probability), top_k, top_p, and a draw with the row's own `torch.Generator` (seeded by the
request's `seed`, or by the seed and the choice index when n > 1). Log-probabilities are those
of the raw model output (vLLM's default `raw_logprobs`): `log_softmax` of the logits before any
penalty or temperature.

Shape legend: V vocabulary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from premoe.serve.decode import SamplingParams


@dataclass
class TokenLogprobs:
    """The chosen token's log-probability and the `top` most likely tokens' (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def needs_processing(p: SamplingParams) -> bool:
    """False for plain greedy rows (a batched argmax is enough)."""
    return not p.greedy or p.penalized or p.logprobs is not None


class RowSampler:
    """The sampling state of one row: its generator and the token counts penalties need."""

    def __init__(
        self, params: SamplingParams, prompt_ids: list[int], vocab: int, device: torch.device
    ) -> None:
        self.params = params
        self.vocab = vocab
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            seed = params.seed
            self.generator.manual_seed(
                int.from_bytes(os.urandom(8), "little") if seed is None else seed % 2**64
            )
        self.counts: torch.Tensor | None = None  # [V] output token counts
        self.seen: torch.Tensor | None = None  # [V] prompt or output token present
        if params.penalized:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < vocab], dtype=torch.long)
            self.seen[ids.to(device)] = True

    def _penalize(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        assert self.counts is not None and self.seen is not None
        x = logits.clone()  # [V]
        if p.repetition_penalty != 1.0:
            r = p.repetition_penalty
            pen = torch.where(x > 0, x / r, x * r)
            x = torch.where(self.seen, pen, x)
        if p.frequency_penalty:
            x = x - p.frequency_penalty * self.counts
        if p.presence_penalty:
            x = x - p.presence_penalty * (self.counts > 0).to(x.dtype)
        return x

    def choose(self, logits: torch.Tensor) -> tuple[int, TokenLogprobs | None]:
        """Next token from the row's raw logits `[V]` (float32), and its logprobs if asked."""
        p = self.params
        x = self._penalize(logits) if p.penalized else logits
        if p.greedy:
            token = int(x.argmax())
        else:
            x = x / p.temperature
            if p.min_p > 0.0:
                probs = torch.softmax(x, -1)
                x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
            if 0 < p.top_k < x.numel():
                kth = torch.topk(x, p.top_k).values[-1]
                x = x.masked_fill(x < kth, float("-inf"))
            probs = torch.softmax(x, -1)  # [V]
            if p.top_p < 1.0:
                sp, idx = probs.sort(descending=True)
                keep = (sp.cumsum(-1) - sp) < p.top_p  # always keeps the top token
                sp = sp * keep
                token = int(idx[torch.multinomial(sp / sp.sum(), 1, generator=self.generator)[0]])
            else:
                token = int(torch.multinomial(probs, 1, generator=self.generator)[0])
        if self.counts is not None and self.seen is not None and 0 <= token < self.vocab:
            self.counts[token] += 1
            self.seen[token] = True
        info = None
        if p.logprobs is not None:
            lp = torch.log_softmax(logits, -1)  # [V]
            top: list[tuple[int, float]] = []
            if p.logprobs > 0:
                vals, ids = torch.topk(lp, min(p.logprobs, lp.numel()))
                top = [(int(i), float(v)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)]
            info = TokenLogprobs(token, float(lp[token]), top)
        return token, info
