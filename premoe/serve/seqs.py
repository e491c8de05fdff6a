"""The rows of the continuous decoder (continuous.py): a running request's state, a decode step
on its way, and what one step did."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from premoe.serve.decode import RowSink, SamplingParams, TextStream
from premoe.serve.sampling import RowSampler


@dataclass(eq=False)
class Seq:
    """One running request (or one of its n choices)."""

    sink: RowSink
    prompt: list[int]
    params: SamplingParams
    pattern: str | None
    sampler: RowSampler
    stream: TextStream
    slot: int
    order: int
    filled: int = 0  # prompt tokens in the cache
    last: int | None = None  # the sampled token not yet in the cache
    generated: int = 0
    done: bool = False
    folded: int = 0  # generated tokens recomputed as part of `prompt` (after a reroute)
    inflight: int = 0  # decode steps that fed it and are not resolved yet (`pipeline`)

    @property
    def length(self) -> int:
        """Tokens in the cache."""
        return self.filled + max(0, self.generated - 1 - self.folded)

    @property
    def prefilling(self) -> bool:
        return self.filled < len(self.prompt)

    @property
    def decodable(self) -> bool:
        """Has a token to feed, and the step in flight (if any) did not sample its last one."""
        if self.prefilling or self.last is None:
            return False
        return self.generated + self.inflight < self.params.max_tokens


@dataclass
class Launched:
    """A decode step on its way: its rows (by slot) and the host copies of what it computes,
    made without waiting; read them once `ready` has passed (None: already there)."""

    seqs: list[Seq]
    logits: torch.Tensor  # [n, V] float32 (valid until the next step runs)
    tokens: torch.Tensor  # [n] host: each slot's greedy sample
    stats: torch.Tensor | None  # [n, ...] host: the meter's figures of slots 0..n-1
    ready: torch.cuda.Event | None


@dataclass
class StepReport:
    prefill_rows: int = 0
    prefill_tokens: int = 0
    prefill_positions: int = 0  # B·S of the prefill forward: padding included
    decode_rows: int = 0
    patterns: set[str] = field(default_factory=set)
    finished: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0  # of `seconds`: the prefill forward and its first samples
    in_flight: bool = False  # the decode step was left running when `step` returned (pipeline)
    rerouted: list[Seq] = field(default_factory=list)  # rows taken out for another pattern
