"""A decode loop that watches the dropped mass and applies a miss policy.

`decode(model, prompt_ids, meter=..., rerouter=...)` runs greedy (or sampled) decoding with a KV
cache, one request (batch 1). With a `MissMeter` it measures the dropped mass of the prompt and of
every generated token (`premoe.load.miss`). With a `rerouter` (the ``reroute`` policy), it checks
the mean dropped mass of the last `window` tokens right after the prompt and then every `window`
generated tokens; above `threshold` it calls the rerouter with the text so far, which may switch
the model to a better pattern (in place) and returns the `Switch` it made; the loop then
recomputes the cache of the text so far under the new pattern and goes on.

Miss policies (`MISS_POLICIES`):

- ``mask``: the pattern's experts only; the router never picks anything else (today's behaviour).
- ``reroute``: ``mask``, plus re-retrieval when the dropped mass says the pattern is wrong; when
  retrieval insists on the failing pattern, the pooled fallback pattern is used instead.
- ``fetch``: exact; missing experts are fetched into the slots (`premoe.load.fetch`).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from premoe.errors import UsageError
from premoe.load.miss import DroppedMass, MassAccumulator, MissMeter

log = logging.getLogger(__name__)

MISS_POLICIES = ("mask", "reroute", "fetch")
DEFAULT_WINDOW = 8
"""Tokens per dropped-mass check of the ``reroute`` policy."""
DEFAULT_REROUTE_THRESHOLD = 0.5
"""Mean dropped mass over a window above which ``reroute`` re-runs retrieval."""


def check_policy(policy: str, window: int, threshold: float) -> None:
    if policy not in MISS_POLICIES:
        raise UsageError(f"unknown --miss-policy {policy!r}; choose {', '.join(MISS_POLICIES)}")
    if window < 1:
        raise UsageError(f"--miss-window must be >= 1, got {window}")
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--miss-threshold must be in [0, 1], got {threshold}")


@dataclass
class Switch:
    """One pattern switch of the ``reroute`` policy."""

    token: int  # generated tokens before the switch (0: decided on the prompt)
    from_task: str
    to_task: str
    similarity: float
    dropped: float  # the window's mean dropped mass that triggered it
    reason: str  # "retrieval" (a better stored pattern) or "fallback" (the pooled one)
    seconds: float = 0.0  # retrieval + swap + recomputing the cache

    def to_json(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "from": self.from_task,
            "to": self.to_task,
            "similarity": self.similarity,
            "dropped": self.dropped,
            "reason": self.reason,
            "seconds": self.seconds,
        }


Rerouter = Callable[[list[int], float, int], "Switch | None"]
"""(token ids so far, the window's dropped mass, generated tokens so far) -> the switch made."""


@dataclass
class Decoded:
    tokens: list[int]  # generated ids (an end-of-sequence id included if one was produced)
    prompt_mass: DroppedMass | None = None
    mass: DroppedMass | None = None  # over the generated tokens the model read back
    switches: list[Switch] = field(default_factory=list)
    seconds: float = 0.0  # prompt + decode
    prefill_seconds: float = 0.0
    checks: int = 0  # window checks made


def _cache(model: Any) -> Any:
    return DynamicCache(config=model.config)


def decode(
    model: Any,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    meter: MissMeter | None = None,
    rerouter: Rerouter | None = None,
    window: int = DEFAULT_WINDOW,
    threshold: float = DEFAULT_REROUTE_THRESHOLD,
    do_sample: bool = False,
    generator: torch.Generator | None = None,
    synchronize: Callable[[], None] = lambda: None,
    after_prompt: Callable[[], Any] | None = None,
) -> Decoded:
    """Decode up to `max_new_tokens` after `prompt_ids` (batch 1); see the module doc.
    `after_prompt` runs once the prompt's forward is done (its time counts as the prompt's)."""
    if rerouter is not None and meter is None:
        raise UsageError("the reroute policy needs the dropped-mass meter")
    device = next(model.parameters()).device
    eos = set(int(e) for e in eos_ids)
    layers = len(meter.layers) if meter is not None else 0
    acc_prompt = MassAccumulator(layers, 1, device, tail=window) if meter else None
    acc_gen = MassAccumulator(layers, 1, device, tail=window) if meter else None
    ids = [int(i) for i in prompt_ids]
    out = Decoded(tokens=[])

    # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` deprecated)
    cache_arg = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else ("past_key_values")
    )

    def forward(new: Sequence[int], cache: Any) -> torch.Tensor:
        x = torch.tensor([list(new)], device=device)  # [1, S]
        kwargs = {cache_arg: cache}
        return model(input_ids=x, use_cache=True, **kwargs).logits[0, -1]  # [V]

    def pick(logits: torch.Tensor) -> int:
        if do_sample:
            p = logits.float().softmax(-1)
            return int(torch.multinomial(p, 1, generator=generator))
        return int(logits.argmax())

    def reroute(mass: float) -> Any:
        """Let the rerouter switch; on a switch, the new cache and next-token logits."""
        assert rerouter is not None and meter is not None
        t0 = time.perf_counter()
        with meter.paused():
            switch = rerouter(ids, mass, len(out.tokens))
            if switch is None:
                return None
            cache = _cache(model)
            logits = forward(ids, cache)
        synchronize()
        switch.seconds = time.perf_counter() - t0
        out.switches.append(switch)
        log.info(
            "reroute at token %d: %s -> %s (dropped mass %.3f, %s)",
            switch.token,
            switch.from_task,
            switch.to_task,
            mass,
            switch.reason,
        )
        return cache, logits

    with torch.inference_mode():
        synchronize()
        t0 = time.perf_counter()
        if meter is not None:
            meter.target = acc_prompt
        cache = _cache(model)
        logits = forward(ids, cache)
        synchronize()
        if after_prompt is not None:  # e.g. FetchingModel.adapt: the prompt's own experts
            after_prompt()
        out.prefill_seconds = time.perf_counter() - t0
        if rerouter is not None and acc_prompt is not None:
            out.checks += 1
            mass = acc_prompt.window()[0]
            got = reroute(mass) if mass > threshold else None
            if got is not None:
                cache, logits = got
        if meter is not None:
            meter.target = acc_gen
        while len(out.tokens) < max_new_tokens:
            tok = pick(logits)
            out.tokens.append(tok)
            ids.append(tok)
            if tok in eos or len(out.tokens) >= max_new_tokens:
                break
            logits = forward([tok], cache)
            if rerouter is not None and acc_gen is not None and len(out.tokens) % window == 0:
                out.checks += 1
                mass = acc_gen.window()[0]
                if mass > threshold:
                    got = reroute(mass)
                    if got is not None:
                        cache, logits = got
        synchronize()
        out.seconds = time.perf_counter() - t0
        if meter is not None:
            meter.target = None
    if acc_prompt is not None and acc_gen is not None:
        out.prompt_mass = acc_prompt.summary(0)
        out.mass = acc_gen.summary(0)
    return out


__all__ = [
    "DEFAULT_REROUTE_THRESHOLD",
    "DEFAULT_WINDOW",
    "MISS_POLICIES",
    "Decoded",
    "Rerouter",
    "Switch",
    "check_policy",
    "decode",
]
