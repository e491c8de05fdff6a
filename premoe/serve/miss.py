"""Miss-aware serving: per-row dropped mass and the ``reroute`` policy for `premoe serve`.

The dropped mass of a token (`premoe.load.miss`) is the share of the FULL router's top-k weight
that lands on experts its row cannot use. In a continuous batch every row has its own resident
set, its pattern's experts (mixed mode: the row mask over the resident union; swap mode: the
resident pattern), so `RowMeter` measures each token against its own row's pattern: the full
router rows (`FullRouterRows`) give logits for every MoE layer in one batched matmul after the
forward (decode steps; one [T, E] matmul per layer for longer forwards), and a per-pattern
non-resident table [P, L, E] is gathered per token. `SlotMiss` keeps the sums per KV slot on
the device (`MassAccumulator`, no host sync per step) and hands each finished request its
`DroppedMass` over its generated tokens (as `premoe generate --json` counts them: every
generated token the model read back).

``reroute`` (`--miss-policy reroute`): right after a prompt (its last `window` tokens) and
every `window` generated tokens, a row's windowed mean dropped mass is read (one host sync for
the rows due); above `threshold`, retrieval runs on the last `2 * window` tokens of prompt +
generated text (requests that name their pattern keep it). When it picks another pattern (or,
when it insists on a pattern that already failed, the pooled `__global__` one), the row leaves
its slot before sampling from the failing pattern's logits, and its request goes back to the
scheduler under the new pattern, prompt + generated text as its new prompt (recomputed,
unmeasured, under the new pattern, as `premoe generate` recomputes its cache; the next token
is sampled from that): in mixed mode it is admitted again at once (it is the oldest), in swap
mode the scheduler regroups it with its new pattern's requests.

``fetch`` is not offered: rows of a batch share the resident expert slots, so fetching one
row's missing experts would evict experts another row is using.

Shape legend: B rows of one forward, S tokens per row, T = B·S, L MoE layers, E routed
experts, P patterns, N KV slots, k routed experts per token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary, WeakSet

import torch

from premoe.arch.model import router_module
from premoe.load.decode import DEFAULT_REROUTE_THRESHOLD, DEFAULT_WINDOW
from premoe.load.miss import (
    DroppedMass,
    FullRouterRows,
    MassAccumulator,
    MissMeter,
    resident_mask,
)
from premoe.prune import KeepSets
from premoe.runtime import upload
from premoe.serve import meter_fold
from premoe.serve.requests import GenRequest

if TYPE_CHECKING:
    from premoe.serve.continuous import Seq

log = logging.getLogger(__name__)

GLOBAL_PATTERN = "__global__"


@dataclass
class Reroute:
    """One pattern switch of a served request."""

    at_token: int  # generated tokens before the switch (0: decided on the prompt)
    from_task: str
    to_task: str
    mass: float  # the window's mean dropped mass that triggered it
    similarity: float | None
    reason: str  # "retrieval" or "fallback"

    def to_json(self) -> dict[str, Any]:
        return {
            "at_token": self.at_token,
            "from": self.from_task,
            "to": self.to_task,
            "mass": self.mass,
            "similarity": self.similarity,
            "reason": self.reason,
        }


def merge(a: DroppedMass | None, b: DroppedMass) -> DroppedMass:
    """The dropped mass over the tokens of `a` and `b` together."""
    if a is None or a.tokens == 0:
        return b
    if b.tokens == 0:
        return a
    n = a.tokens + b.tokens
    per_layer = [
        (x * a.tokens + y * b.tokens) / n for x, y in zip(a.per_layer, b.per_layer, strict=True)
    ]
    return DroppedMass(
        tokens=n,
        mean=(a.mean * a.tokens + b.mean * b.tokens) / n,
        max=max(a.max, b.max),
        max_layer=max(a.max_layer, b.max_layer),
        per_layer=per_layer,
    )


def response_fields(gens: Sequence[GenRequest]) -> dict[str, Any]:
    """`dropped_mass` ({mean, max, tokens} over the generated tokens of all `gens`, null when
    not metered) and `switches` for a response's `premoe` object."""
    masses = [g.dropped_mass for g in gens]
    total: DroppedMass | None = None
    for m in masses:
        if m is not None:
            total = merge(total, m)
    switches = []
    for i, g in enumerate(gens):
        for sw in g.switches:
            switches.append({**sw.to_json(), **({"index": i} if len(gens) > 1 else {})})
    return {
        "dropped_mass": None
        if total is None
        else {"mean": total.mean, "max": total.max, "tokens": total.tokens},
        "switches": switches,
    }


class RowMeter(MissMeter):
    """A shadow `MissMeter` whose resident set is per row: each token is measured against its
    own row's pattern (`measure(target, patterns, tokens_per_row)` around a forward)."""

    def __init__(
        self,
        model: Any,
        source: Any,
        patterns: Mapping[str, KeepSets],
        rows: FullRouterRows | None = None,
    ) -> None:
        """`source`: the `ModelSource` (its arch, and the full router rows unless `rows`)."""
        if rows is None:
            router = router_module(model, source.arch, source.moe_layers[0])
            w = router.get_parameter(source.arch.router_weight.memory.rsplit(".", 1)[1])
            rows = FullRouterRows.from_source(source, w.device, w.dtype)
        first = next(iter(patterns.values()))
        num_experts = rows.weight.shape[1]
        super().__init__(model, source.arch, first.layers, num_experts=num_experts, rows=rows)
        self.names = list(patterns)
        self._index = {name: i for i, name in enumerate(self.names)}
        e = self.num_experts
        masks = [resident_mask(self.layers, k.layers, e, "cpu") for k in patterns.values()]
        self.masks = torch.stack(masks).to(self.device)  # [P, L, E] 1.0: not resident
        self._layer_ids = torch.arange(len(self.layers), device=self.device)  # [L]
        self._tok: torch.Tensor | None = None  # [T] pattern index of every token

    @contextmanager
    def measure(
        self, target: MassAccumulator, patterns: Sequence[str | None], tokens_per_row: int
    ) -> Iterator[None]:
        """Measure the forward run inside the block into `target`; row b routes among
        `patterns[b]`'s experts (None: an idle row, measured against pattern 0 and masked)."""
        idx = torch.tensor([0 if p is None else self._index[p] for p in patterns])  # [B]
        tok = upload(idx, self.device)
        self._tok = tok if tokens_per_row == 1 else tok.repeat_interleave(tokens_per_row)
        self.target = target
        try:
            yield
        finally:
            self.target = None
            self._tok = None

    def index(self, pattern: str) -> int:
        return self._index[pattern]

    def tapped_rows(self, b: int, tok: torch.Tensor) -> torch.Tensor:
        """`tapped(b)` [L, b], row i measured against pattern `tok[i]` (tok [b], device)."""
        self._tok = tok
        try:
            return self.tapped(b)
        finally:
            self._tok = None

    def fold_tapped(
        self, b: int, tok: torch.Tensor, live: torch.Tensor, sums: SlotAccumulator
    ) -> None:
        """`sums.add_rows(tapped_rows(b, tok), live)`: the full routers' matmul and two small
        kernels (meter_fold.py) where they run, else in torch. Sync-free (captured in graphs)."""
        assert self.rows is not None and self._tap is not None
        if not meter_fold.available(self.device, self.scoring):
            sums.add_rows(self.tapped_rows(b, tok), live)
            return
        logits = self._full_logits(self._tap[:, :b])  # [L, B, E]
        meter_fold.fold(logits, tok, self.masks, live, sums, k=self.rule.top_k,
                        scoring=self.scoring, bias=self.rows.bias,
                        correction=self.rows.correction)  # fmt: skip

    def _share(self, w: torch.Tensor, idx: torch.Tensor, index: int | None) -> torch.Tensor:
        """Σ_j w·1[idx ∉ S_row] / Σ_j w, S_row the token's row's pattern."""
        tok = self._tok
        assert tok is not None
        if index is None:  # idx [L, T, k]
            miss = self.masks[tok[None, :, None], self._layer_ids[:, None, None], idx]
        else:  # idx [T, k]
            miss = self.masks[tok[:, None], index, idx]
        w = w.float()
        return (w * miss).sum(-1) / w.sum(-1).clamp(min=1e-20)


class SlotAccumulator(MassAccumulator):
    """A `MassAccumulator` with one row per KV slot: `plan(slots, mask)` before a forward says
    which slot each forward row is (distinct) and which tokens count; `add` folds each row into
    its slot (no window tail)."""

    def __init__(self, layers: int, slots: int, device: torch.device | str) -> None:
        super().__init__(layers, slots, device)
        self._slots: torch.Tensor | None = None  # [B]
        self._mask: torch.Tensor | None = None  # [B, S]

    def plan(self, slots: Sequence[int], mask: torch.Tensor) -> None:
        dev = self.sum.device
        self._slots = upload(torch.tensor(list(slots), dtype=torch.long), dev)
        self._mask = upload(mask.float(), dev)

    def add(self, dropped: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        slots, m = self._slots, self._mask  # [B], [B, S]
        assert slots is not None and m is not None
        d = dropped.float() * m  # [L, B, S]
        self.sum.index_add_(0, slots, d.sum(-1).T)  # [B, L] into [N, L]
        self.max_layer[slots] = torch.maximum(self.max_layer[slots], d.amax(-1).T)
        per_token = d.mean(0)  # [B, S]
        self.max_token[slots] = torch.maximum(self.max_token[slots], per_token.amax(-1))
        self.win_sum.index_add_(0, slots, per_token.sum(-1))
        n = m.sum(-1)  # [B]
        self.count.index_add_(0, slots, n)
        self.win_count.index_add_(0, slots, n)

    def add_rows(self, dropped: torch.Tensor, live: torch.Tensor) -> None:
        """Fold one decode step's `dropped` [L, B] of slots 0..B-1 (row b is slot b) in, rows
        with `live` [B] 0.0 not at all: in place on views, no indexing (captured in graphs)."""
        b = dropped.shape[1]
        d = dropped.float() * live  # [L, B]
        self.sum[:b].add_(d.T)
        self.max_layer[:b].copy_(torch.maximum(self.max_layer[:b], d.T))
        per_token = d.mean(0)  # [B]
        self.max_token[:b].copy_(torch.maximum(self.max_token[:b], per_token))
        self.win_sum[:b].add_(per_token)
        self.count[:b].add_(live)
        self.win_count[:b].add_(live)


class SlotMiss:
    """Per-slot dropped mass of a `ContinuousDecoder`'s rows, and the reroute checks.

    The decoder calls `admit(seq)` when a row takes a slot, wraps each forward in
    `forward(rows, s, prefill, spans)`, asks `prompt_misses` / `decode_misses` which rows to
    take out (the ``reroute`` decision, `decide`), and calls `detach(seq)` / `end(seq)` when a
    row leaves its slot for another pattern / ends. `on_mass(seq, mass)` gets every ended row's
    `DroppedMass` over its generated tokens.
    """

    def __init__(
        self,
        meter: RowMeter,
        slots: int,
        *,
        window: int = DEFAULT_WINDOW,
        threshold: float = DEFAULT_REROUTE_THRESHOLD,
        decide: Callable[[Seq, float], bool] | None = None,
        on_mass: Callable[[Seq, DroppedMass], None] | None = None,
    ) -> None:
        layers = len(meter.layers)
        self.meter = meter
        self.window, self.threshold = window, threshold
        self.decide = decide
        self.on_mass = on_mass
        self.gen = SlotAccumulator(layers, slots, meter.device)
        self.prompt = SlotAccumulator(layers, slots, meter.device)
        # per row, forgotten with it (a row may be dropped while it waits for a slot)
        self.measured: WeakKeyDictionary[Seq, int] = WeakKeyDictionary()  # tokens measured
        self.carried: WeakKeyDictionary[Seq, DroppedMass] = WeakKeyDictionary()  # older slots
        self.resumed: WeakSet[Seq] = WeakSet()  # rows recomputing their text (not measured)

    # -- rows ------------------------------------------------------------------------------------
    def admit(self, seq: Seq, resumed: bool = False) -> None:
        self.gen.reset(seq.slot)
        self.prompt.reset(seq.slot)
        self.measured.setdefault(seq, 0)
        if resumed:
            self.resumed.add(seq)

    def detach(self, seq: Seq) -> None:
        """`seq` leaves its slot and will continue in another: keep what it measured."""
        self.carried[seq] = merge(self.carried.get(seq), self.gen.summary(seq.slot))

    def end(self, seq: Seq, cancelled: bool = False, snapshot: torch.Tensor | None = None) -> None:
        """`seq` ended; its figures are its slot's now, or those in `snapshot` (`snapshot`)."""
        carried = self.carried.pop(seq, None)
        self.measured.pop(seq, None)
        self.resumed.discard(seq)
        if cancelled or self.on_mass is None:
            return
        self.on_mass(seq, merge(carried, self.gen.summary(seq.slot, snapshot)))

    def snapshot(self, slots: int) -> torch.Tensor:
        """Slots 0..slots-1 once the work queued so far has run, without waiting for it (a
        decode step in flight: its rows may end only after the next step has started)."""
        return self.gen.snapshot(slots)

    # -- measuring -------------------------------------------------------------------------------
    @contextmanager
    def forward(
        self,
        rows: Sequence[Seq | None],
        s: int,
        prefill: bool,
        spans: Sequence[tuple[int, int]] = (),
    ) -> Iterator[None]:
        """Measure the forward inside the block: decode (`s` = 1; None rows are idle), or a
        prefill whose row b holds prompt tokens `spans[b]` = (start, end), left-padded to `s`
        (only the last `window` prompt tokens of rows not being recomputed count, and only
        when rerouting)."""
        if prefill:
            mask = torch.zeros(len(rows), s)  # [B, S]
            if self.decide is not None:
                for b, (seq, (start, end)) in enumerate(zip(rows, spans, strict=True)):
                    if seq is None or seq in self.resumed:
                        continue
                    first = max(start, len(seq.prompt) - self.window)
                    if first < end:
                        mask[b, s - (end - first) :] = 1.0
        else:  # decode: row b is slot b
            mask = torch.tensor([[float(q is not None)] for q in rows])  # [B, 1]
        if not bool(mask.any()):
            yield
            return
        acc = self.prompt if prefill else self.gen
        acc.plan([b if q is None else q.slot for b, q in enumerate(rows)], mask)
        with self.meter.measure(acc, [None if q is None else q.pattern for q in rows], s):
            yield

    # -- CUDA graphs (premoe.serve.graphs) ---------------------------------------------------------
    def enable_graphs(self) -> None:
        """Decode steps run as graph replays: each captured step measures its rows right after
        the step and folds them into their slots (`captured`), reading the rows' pattern indices
        and which rows are live from buffers `before_replay` fills; a replay costs nothing more."""
        n = self.gen.rows
        self.meter.enable_tap(n)
        dev = self.meter.device
        self._graph_tok = torch.zeros(n, dtype=torch.long, device=dev)  # [N] pattern index
        self._graph_live = torch.zeros(n, dtype=torch.float32, device=dev)  # [N] 1.0: decoding
        self._graph_rows: tuple[tuple[bool, str | None], ...] | None = None  # buffers' rows
        self._warm_sums = SlotAccumulator(self.gen.layers, n, dev)  # what warm-up runs fold

    def tapping(self) -> AbstractContextManager[None]:
        return self.meter.tapping()

    def captured(self, b: int, *, warm: bool) -> None:
        # a warm-up run executes: it folds into scratch sums, the running rows' stay as they are
        sums = self._warm_sums if warm else self.gen
        self.meter.fold_tapped(b, self._graph_tok[:b], self._graph_live[:b], sums)

    def before_replay(self, rows: Sequence[Seq | None]) -> None:
        """Rows 0..n-1 of the next replay (row b is slot b; None: idle): fills the buffers when
        they changed since the last replay (non-blocking)."""
        key = tuple((q is not None, None if q is None else q.pattern) for q in rows)
        if key == self._graph_rows:
            return
        tok = torch.zeros(self.gen.rows, dtype=torch.long)  # [N]
        live = torch.zeros(self.gen.rows)  # [N]
        for b, (is_live, pattern) in enumerate(key):  # as `forward`: no pattern -> pattern 0
            if is_live:
                tok[b], live[b] = 0 if pattern is None else self.meter.index(pattern), 1.0
        self._graph_tok.copy_(upload(tok, self._graph_tok.device))
        self._graph_live.copy_(upload(live, self._graph_live.device))
        self._graph_rows = key

    # -- reroute checks --------------------------------------------------------------------------
    def prompt_misses(self, seqs: Sequence[Seq]) -> list[Seq]:
        """Rows whose prompt is now complete that `decide` takes out (reroute)."""
        check = [q for q in seqs if q not in self.resumed]
        for q in seqs:
            self.resumed.discard(q)
        if self.decide is None or not check:
            return []
        masses = self.prompt.window([q.slot for q in check])
        return [q for q, m in zip(check, masses, strict=True) if self._decide(q, m)]

    def decode_misses(self, seqs: Sequence[Seq]) -> list[Seq]:
        """Rows decoded this step (their fed token measured) that `decide` takes out."""
        due = []
        for q in seqs:
            self.measured[q] = self.measured.get(q, 0) + 1
            if self.measured[q] % self.window == 0:
                due.append(q)
        if self.decide is None or not due:
            return []
        masses = self.gen.window([q.slot for q in due])
        return [q for q, m in zip(due, masses, strict=True) if self._decide(q, m)]

    def _decide(self, seq: Seq, mass: float) -> bool:
        assert self.decide is not None
        if mass <= self.threshold or seq.sink.cancelled:
            return False
        return self.decide(seq, mass)


__all__ = [
    "Reroute",
    "RowMeter",
    "SlotAccumulator",
    "SlotMiss",
    "merge",
    "response_fields",
]
