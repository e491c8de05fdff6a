"""Continuous batching: requests join and leave the running batch between decode steps.

Shape legend: N slots, B rows of one forward, S tokens per row of a prefill chunk, L MoE
layers, U resident expert slots, V vocabulary, K KV columns read (`kv_len`).

Each admitted request (`Seq`) owns a slot of the `SlotKVCache` until it ends. One `step()`:

1. Drops rows whose client left (their slot is free at once).
2. Prefill, batched and chunked: rows that still have prompt tokens to process get the next
   chunk of them, oldest first, while the padded forward [B, S] stays within `prefill_tokens`
   positions: a row's rest of the prompt whole where it fits (S grows to it), else as much of it
   as the width S allows (the oldest row: up to `prefill_tokens`). This bounds how long the
   running rows' decode stalls for newcomers, and the activations of the forward (memory.py's
   headroom), at `prefill_tokens` positions a step, padding included: a sum of chunk lengths
   would not (one 256-token chunk beside 255 one-token chunks is a [256, 256] forward). Whole
   prompts where they fit: cutting every row to the oldest one's chunk cost 14-20 % of the CPU
   bench's tokens/s at concurrency 64 and 256 (more forwards, each row's prompt in pieces).
   Chunks are left-padded within the forward (padding is written to the scratch column and
   attends to nothing real), so the last position is every row's last prompt token of the
   chunk; a row whose prompt is now complete samples its first token from it.
3. One decode step for every row that has a sampled token not yet in the cache: the forward runs
   over slots 0..n-1 (n: the highest such slot + 1, so the cache is a view, no copy); idle and
   still-prefilling slots in that range are fed a padding token written to scratch. On CUDA
   with `graphs`, this step is a CUDA graph replay (graphs.py), and by default (`fuse`) the
   model's sibling projections run as one matmul (fusion.py), each router's forward as its
   logits' matmul and one kernel (fused_router.py; else its top-k as one kernel, topk.py),
   the attention of the step's one query per row as one kernel (attention.py) and every
   one-row linear layer but the LM head as one Triton GEMV (gemv_linear.py).

With `pipeline` (the default with CUDA graphs) a decode step is launched before the host reads
the last one's samples, as vLLM's async scheduling does: every step also takes each row's argmax
on the device (`sampled`), a row fed in the step still running gets that sample as its next
token on the device (`fed`), and the host hands the last step's tokens to their rows (detokenizes,
streams, checks stop conditions) while the device runs the next one. A row whose stop string or
stop token shows only then has its last token fed once more in the step already running, and
that step's sample is dropped; a row that ends on max_tokens is not fed again; the meter's
figures of an ending row are copied as of the step that sampled its last token (`Launched`).
Steps with a row that samples, has penalties or logprobs, or may be rerouted are read at once
(their sampling needs the step's logits on the host).

Rows finish independently (end of sequence, a stop string or token, max_tokens); their slot is
free for the next step. Masks are built here (4-D additive; key j visible to a query at position
p of the same row iff j <= p), and position ids count the row's own tokens, so every row computes
what it would alone. With `routing` (rowmask.py) every row also routes only among its own
pattern's experts. With `miss` (miss.py) every row's dropped mass is measured against its own
pattern, and a row the ``reroute`` policy takes out leaves its slot before sampling from the
failing pattern (`StepReport.rerouted`); `resume` later puts it into a slot again, its text so
far recomputed as its prompt under its new pattern.

One module because prefill, decode and the pipelined read of a step all act on the same slots,
slot KV cache and rows; the records of rows and steps are in seqs.py.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

from premoe.serve import attention, fused_router, gemv_linear, topk
from premoe.serve.decode import (
    NullSink,
    RowSink,
    SamplingParams,
    TextStream,
    _eos_ids,
    _forward_cache_kwarg,
    last_logits,
)
from premoe.serve.fusion import fuse_projections
from premoe.serve.graphs import DecodeGraphs, Regions
from premoe.serve.kvcache import SlotKVCache
from premoe.serve.rowmask import RowRouting, Rows
from premoe.serve.sampling import RowSampler, TokenLogprobs, needs_processing
from premoe.serve.seqs import Launched, Seq, StepReport

if TYPE_CHECKING:
    from premoe.serve.miss import SlotMiss

log = logging.getLogger(__name__)


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The model's decoder layers: its module list of `num_hidden_layers` entries."""
    n = int(model.config.num_hidden_layers)
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise ValueError(f"no list of {n} decoder layers in {type(model).__name__}")


class ContinuousDecoder:
    """Iteration-level scheduling of rows over a per-slot KV cache (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        slots: int,
        max_len: int,
        prefill_tokens: int = 512,
        routing: RowRouting | None = None,
        eos_ids: set[int] | None = None,
        pad_id: int | None = None,
        graphs: bool = False,
        compile: bool = False,
        fuse: bool | None = None,
        pipeline: bool | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.prefill_tokens = max(1, prefill_tokens)
        self.routing = routing
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.min_value = torch.finfo(self.dtype).min
        self.vocab = int(model.config.vocab_size)
        self.eos_ids = eos_ids if eos_ids is not None else _eos_ids(model, tokenizer)
        if pad_id is None:
            pad_id = tokenizer.pad_token_id
            if pad_id is None:
                pad_id = next(iter(self.eos_ids), 0)
        self.pad_id = int(pad_id)
        self.cache = SlotKVCache(model.config, slots, max_len, self.dtype, self.device)
        self.seqs: list[Seq | None] = [None] * slots
        self._kw = _forward_cache_kwarg(model)
        self._order = itertools.count()
        self.graphs: DecodeGraphs | None = None
        graphs = graphs and self.device.type == "cuda"
        # the next step is launched before the last one's samples are read (module docstring)
        self.pipeline = graphs if pipeline is None else pipeline
        self.sampled = torch.zeros(slots, dtype=torch.long, device=self.device)  # [N] argmax
        self._inflight: Launched | None = None
        fuse = graphs if fuse is None else fuse
        self.fused_routers: fused_router.FusedRouters | None = None
        if fuse:  # q/k/v (and gate/up) as one matmul (fusion.py)
            one = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
            fuse_projections(model, lambda: model(input_ids=one, use_cache=False))
            if graphs:  # on CUDA: each router's forward as its matmul and one kernel
                self.fused_routers = fused_router.for_model(model)
        if graphs:
            self.graphs = self._decode_graphs(compile, fuse)
        # prefill forwards run compiled layers too (`_prefill_compiled`): these, or the step's
        self.compile_prefill = True
        self.prefill_regions: Regions | None = None
        self.miss: SlotMiss | None = None  # dropped mass and reroute checks (miss.py)
        self.taken_out: list[Seq] = []  # rows taken out by reroutes, for the caller to requeue

    def set_miss(self, miss: SlotMiss) -> None:
        """Measure (and check) every row with `miss`; captured decode steps then measure inside
        the graph (graphs.py, SlotMiss.captured)."""
        self.miss = miss
        if self.graphs is not None:
            miss.enable_graphs()
            self.graphs.meter = miss
            self.graphs.graphs.clear()

    # -- rows ------------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return len(self.seqs)

    def free(self) -> int:
        return sum(1 for s in self.seqs if s is None)

    def active(self) -> list[Seq]:
        return [s for s in self.seqs if s is not None]

    def patterns(self) -> set[str]:
        return {s.pattern for s in self.seqs if s is not None and s.pattern is not None}

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len < 1:
            raise ValueError("empty prompt")
        if prompt_len + max_tokens > self.max_len:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context "
                f"window of {self.max_len} tokens"
            )

    def add(
        self,
        sink: RowSink,
        prompt: list[int],
        params: SamplingParams,
        pattern: str | None = None,
        *,
        ignore_eos: bool = False,
    ) -> Seq:
        """Admit a row into the lowest free slot (call `free()` first)."""
        self.check_fits(len(prompt), params.max_tokens)
        slot = next(i for i, s in enumerate(self.seqs) if s is None)
        stops = set(params.stop_token_ids)
        if not (ignore_eos or params.ignore_eos):
            stops |= self.eos_ids
        seq = Seq(
            sink=sink,
            prompt=list(prompt),
            params=params,
            pattern=pattern,
            sampler=RowSampler(params, prompt, self.vocab, self.device),
            stream=TextStream(self.tokenizer, params.stop, stops),
            slot=slot,
            order=next(self._order),
        )
        self.seqs[slot] = seq
        if self.miss is not None:
            self.miss.admit(seq)
        return seq

    def resume(self, seq: Seq, pattern: str | None) -> None:
        """Put a row taken out by a reroute into the lowest free slot, under `pattern`: its
        prompt and every token it generated are prefilled again, and its next token is sampled
        from that (as `premoe generate` recomputes its cache after a switch)."""
        slot = next(i for i, s in enumerate(self.seqs) if s is None)
        assert len(seq.stream.ids) == seq.generated, "a live row holds all it generated"
        seq.prompt = seq.prompt[: len(seq.prompt) - seq.folded] + list(seq.stream.ids)
        seq.folded, seq.filled, seq.last = seq.generated, 0, None
        seq.slot, seq.pattern = slot, pattern
        self.seqs[slot] = seq
        if self.miss is not None:
            self.miss.admit(seq, resumed=True)

    def _take_out(self, seqs: Sequence[Seq], report: StepReport) -> None:
        assert self.miss is not None
        for seq in seqs:
            self.miss.detach(seq)
            self.seqs[seq.slot] = None
            report.rerouted.append(seq)
            self.taken_out.append(seq)

    def _end(
        self, seq: Seq, reason: str, report: StepReport, stats: torch.Tensor | None = None
    ) -> None:
        """`seq` ends; `stats`: the meter's figures as of the step that sampled its last token."""
        seq.done = True
        self.seqs[seq.slot] = None
        report.finished += 1
        if self.miss is not None:
            self.miss.end(seq, cancelled=reason == "cancelled", snapshot=stats)
        seq.sink.on_finish(reason, seq.generated)

    def settle(self, report: StepReport | None = None) -> None:
        """Wait for the step in flight, if any, and hand its samples to its rows (before the
        resident experts change under it, e.g.)."""
        step, self._inflight = self._inflight, None
        if step is not None:
            self._resolve(step, report or StepReport())

    def clear(self) -> list[Seq]:
        """Drop every row (a failed step) and the step in flight; the rows dropped."""
        rows = self.active()
        self.seqs = [None] * self.slots
        self._inflight = None
        for seq in rows:
            seq.inflight = 0
        return rows

    def drop_cancelled(self, report: StepReport) -> None:
        for seq in self.active():
            if seq.sink.cancelled:
                self._end(seq, "cancelled", report)

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, between: Callable[[], None] | None = None) -> StepReport:
        """Prefill (bounded) and one decode step; `between` runs before each forward."""
        t0 = time.perf_counter()
        report = StepReport()
        self.drop_cancelled(report)
        pending = sorted((s for s in self.active() if s.prefilling), key=lambda s: s.order)
        chunks: list[tuple[Seq, int, int]] = []
        width = 0  # S of the forward [B, S]: its longest chunk
        for seq in pending:
            n, b = min(len(seq.prompt) - seq.filled, self.prefill_tokens), len(chunks) + 1
            if b * max(width, n) > self.prefill_tokens:  # whole, the row would widen it too far
                if b * width > self.prefill_tokens:
                    break
                n = width  # the part of it that fits the width
            width = max(width, n)
            chunks.append((seq, seq.filled, seq.filled + n))
        if chunks:
            if between is not None:
                between()
            t1 = time.perf_counter()
            self._prefill(chunks, report)
            report.prefill_seconds = time.perf_counter() - t1
        rows = [s for s in self.active() if s.decodable]
        if rows:
            if between is not None:
                between()
            self._decode(rows, report)
        else:  # nothing more to launch: read the last step
            self.settle(report)
        report.seconds = time.perf_counter() - t0
        return report

    def _forward(
        self,
        ids: torch.Tensor,  # [B, S]
        positions: torch.Tensor,  # [B, S]
        mask: torch.Tensor,  # [B, 1, S, K] additive
        rows: Rows | None,  # per-row routing masks [B, L, U] and patterns [B] (`routing`)
        metered: AbstractContextManager[Any] | None = None,
    ) -> torch.Tensor:
        """Last-position logits [B, V] (float32); `metered` wraps the forward."""
        with metered or nullcontext():
            if self.routing is not None and rows is not None:
                with self.routing.applied(rows, ids.shape[1]):
                    return self._logits(ids, positions, mask)
            return self._logits(ids, positions, mask)

    def _logits(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The model's last-position logits [B, V] (float32) over the slot cache."""
        return last_logits(self.model, ids, positions, mask, self._kw, self.cache)

    @contextmanager
    def _patched(self, fuse: bool) -> Iterator[None]:
        """Around a traced decode step: the routers' top-k, the one-query attention and the
        one-row GEMV kernels (`fuse`), the row-mask hook."""
        with ExitStack() as stack:
            if fuse:
                stack.enter_context(topk.patched(self.device))
                if self.fused_routers is not None:
                    stack.enter_context(self.fused_routers.patched())
                if attention.ENABLED:
                    stack.enter_context(attention.patched(self.device))
                stack.enter_context(gemv_linear.patched(self.device))  # before the row-mask hook
            if self.routing is not None:
                stack.enter_context(self.routing.hooked())
            yield

    def _prefill_regions(self) -> Regions | None:
        if self.prefill_regions is not None or self.graphs is None:
            return self.prefill_regions
        return self.graphs.regions

    def _prefill_compiled(self) -> AbstractContextManager[None]:
        """Around a prefill forward: the decode step's compiled layers and patches (graphs.py),
        so a chunk runs inductor's kernels, not some 40 eager ops per layer (a host-bound 30 ms
        forward on an H200, paid by every request's time to first token). Not while prompts
        are measured for rerouting (the meter's hooks would be traced per pattern set)."""
        regions = self._prefill_regions()
        rerouting = self.miss is not None and self.miss.decide is not None
        if regions is None or rerouting or not self.compile_prefill:
            return nullcontext()
        stack = ExitStack()
        if self.graphs is not None:
            stack.enter_context(self.graphs.patched())
        stack.enter_context(regions.active())
        return stack

    def _graph_step(
        self,
        ids: torch.Tensor,  # [B, 1]
        fed: torch.Tensor,  # [B, 1] 1: the row's token is its sample of the last step
        positions: torch.Tensor,  # [B, 1]
        mask: torch.Tensor,  # [B, 1, 1, K] additive
        rows: Rows | None,  # per-row routing masks [B, L, U] and patterns [B] (`routing`)
    ) -> torch.Tensor:
        """`_forward` as the decode graphs trace it (inside `_patched`): no context manager,
        the rows set as plain state (rowmask.RowRouting.use), so torch.compile sees one graph.
        With the tokens fed and sampled on the device (`_fed`, `_sample`)."""
        if self.routing is not None:
            self.routing.use(rows)
        logits = self._logits(self._fed(ids, fed), positions, mask)  # [B, V]
        if self.routing is not None:
            self.routing.use(None)
        self._sample(logits)
        return logits

    def _fed(self, ids: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
        """ids [B, 1], where `fed` [B, 1] says so the row's sample of the last step instead."""
        return torch.where(fed > 0, self.sampled[: ids.shape[0], None], ids)

    def _sample(self, logits: torch.Tensor) -> None:
        """Every row's greedy sample of `logits` [B, V], kept on the device (`sampled`)."""
        self.sampled[: logits.shape[0]].copy_(logits.argmax(-1))

    def _decode_graphs(self, compile: bool, fuse: bool) -> DecodeGraphs:
        """The decode step's CUDA graphs (captured per bucket on first use or at warm-up)."""
        routing = self.routing
        return DecodeGraphs(
            self._graph_step,
            lambda cols, kv_len: self.cache.plan(None, cols, kv_len),
            slots=len(self.seqs),
            max_len=self.max_len,
            pad_id=self.pad_id,
            scratch=self.cache.scratch,
            dtype=self.dtype,
            device=self.device,
            row_mask_shape=None if routing is None else (len(routing.layers), routing.union.count),
            compile_layers=decoder_layers(self.model) if compile else (),
            patched=functools.partial(self._patched, fuse),
            keep=[self.sampled],
        )

    def _rows(self, patterns: Sequence[str | None]) -> Rows | None:
        return None if self.routing is None else self.routing.rows(patterns)

    def _prefill(self, chunks: list[tuple[Seq, int, int]], report: StepReport) -> None:
        dev = self.device
        b = len(chunks)
        s = max(end - start for _, start, end in chunks)
        ids = torch.full((b, s), self.pad_id, dtype=torch.long)  # [B, S]
        cols = torch.full((b, s), self.cache.scratch, dtype=torch.long)  # [B, S]
        qpos = torch.zeros((b, s), dtype=torch.long)  # [B, S] position of each query
        for i, (seq, start, end) in enumerate(chunks):
            n = end - start
            ids[i, s - n :] = torch.tensor(seq.prompt[start:end], dtype=torch.long)
            cols[i, s - n :] = torch.arange(start, end)
            qpos[i, s - n :] = torch.arange(start, end)
            qpos[i, : s - n] = start  # padding: sees the chunk's first token only
        kv_len = max(end for _, _, end in chunks)
        ids, cols, qpos = ids.to(dev), cols.to(dev), qpos.to(dev)
        keys = torch.arange(kv_len, device=dev)  # [K]
        allowed = keys[None, None, :] <= qpos[:, :, None]  # [B, S, K]
        zero = torch.zeros((), dtype=self.dtype, device=dev)
        mask = torch.where(allowed, zero, self.min_value)[:, None]  # [B, 1, S, K]
        slots = torch.tensor([seq.slot for seq, _, _ in chunks], dtype=torch.long, device=dev)
        self.cache.plan(slots, cols, kv_len)
        metered = None
        if self.miss is not None:
            spans = [(start, end) for _, start, end in chunks]
            metered = self.miss.forward([seq for seq, _, _ in chunks], s, True, spans)
        rows = self._rows([seq.pattern for seq, _, _ in chunks])
        try:
            with self._prefill_compiled():
                logits = self._forward(ids, qpos, mask, rows, metered)  # [B, V]
        except Exception:
            if not self.compile_prefill or self._prefill_regions() is None:
                raise
            # the chunk again, eagerly (it rewrites the same KV columns); later ones too
            log.exception("a compiled prefill failed; prefilling without the compiled layers")
            self.compile_prefill = False
            logits = self._forward(ids, qpos, mask, rows, metered)
        report.prefill_rows += b
        report.prefill_tokens += sum(end - start for _, start, end in chunks)
        report.prefill_positions += b * s
        done = []
        for i, (seq, _, end) in enumerate(chunks):
            seq.filled = end
            if not seq.prefilling:
                done.append(i)
        if done and self.miss is not None:
            out = self.miss.prompt_misses([chunks[i][0] for i in done])
            self._take_out(out, report)
            done = [i for i in done if chunks[i][0] not in out]
        if done:
            self._emit([chunks[i][0] for i in done], logits[done], report)

    def _decode(self, rows: list[Seq], report: StepReport) -> None:
        dev = self.device
        n = max(seq.slot for seq in rows) + 1
        by_slot = {seq.slot: seq for seq in rows}
        host_ids, host_pos, host_fed = [self.pad_id] * n, [0] * n, [0] * n
        host_cols = [self.cache.scratch] * n
        patterns: list[str | None] = [None] * n
        for slot, seq in by_slot.items():
            assert seq.last is not None
            if seq.inflight:  # its token is the step in flight's sample, on the device
                host_fed[slot] = 1
            else:
                host_ids[slot] = seq.last
            host_cols[slot] = host_pos[slot] = seq.length + seq.inflight
            patterns[slot] = seq.pattern
        ids = torch.tensor(host_ids, dtype=torch.long)[:, None]  # [B, 1]
        cols = torch.tensor(host_cols, dtype=torch.long)[:, None]  # [B, 1]
        qpos = torch.tensor(host_pos, dtype=torch.long)[:, None]  # [B, 1]
        fed = torch.tensor(host_fed, dtype=torch.long)[:, None]  # [B, 1]
        kv_len = max(host_pos) + 1
        row_routing = self._rows(patterns)
        if self.graphs is not None:
            if self.miss is not None:  # the replay measures its rows (SlotMiss.captured)
                self.miss.before_replay([by_slot.get(i) for i in range(n)])
            logits = self.graphs.run(ids, qpos, cols, kv_len, row_routing, fed)  # [B, V]
        else:
            metered = None
            if self.miss is not None:
                metered = self.miss.forward([by_slot.get(i) for i in range(n)], 1, False)
            ids, cols, qpos, fed = ids.to(dev), cols.to(dev), qpos.to(dev), fed.to(dev)
            keys = torch.arange(kv_len, device=dev)  # [K]
            allowed = keys[None, :] <= qpos  # [B, K]; idle rows see column 0 only
            zero = torch.zeros((), dtype=self.dtype, device=dev)
            mask = torch.where(allowed, zero, self.min_value)[:, None, None, :]  # [B, 1, 1, K]
            self.cache.plan(None, cols, kv_len)
            logits = self._forward(self._fed(ids, fed), qpos, mask, row_routing, metered)
            self._sample(logits)
        launched = self._launched([by_slot[i] for i in sorted(by_slot)], logits)
        report.decode_rows += len(rows)
        report.patterns |= {p for p in patterns if p is not None}
        last, self._inflight = self._inflight, None
        if last is not None:  # read while this step runs
            self._resolve(last, report)
        if self.pipeline and self._pipelinable(launched.seqs):
            self._inflight = launched
            report.in_flight = True
        else:
            self._resolve(launched, report)

    def _launched(self, seqs: list[Seq], logits: torch.Tensor) -> Launched:
        """The step just queued: host copies of its samples and meter figures (no waiting)."""
        n = logits.shape[0]
        tokens = self.sampled[:n]  # [n]
        stats = self.miss.snapshot(n) if self.miss is not None else None
        ready = None
        if tokens.device.type == "cuda":
            host = torch.empty(n, dtype=torch.long, pin_memory=True)
            tokens = host.copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            tokens = tokens.clone()
        for seq in seqs:
            seq.inflight += 1
        return Launched(seqs, logits, tokens, stats, ready)

    def _pipelinable(self, seqs: list[Seq]) -> bool:
        """Whether the next step may be launched before `seqs`' samples are read: every row is
        plain greedy (its sample is the device's argmax) and no row may be rerouted."""
        if self.miss is not None and self.miss.decide is not None:
            return False
        return not any(needs_processing(seq.params) for seq in seqs)

    def _resolve(self, step: Launched, report: StepReport) -> None:
        """Hand a launched step's samples to its rows (waits for the step to finish). Rows that
        ended since it was launched drop theirs."""
        if step.ready is not None:
            step.ready.synchronize()
        tokens = step.tokens.tolist()
        seqs = []
        for seq in step.seqs:
            seq.inflight -= 1
            if not seq.done and self.seqs[seq.slot] is seq:
                seqs.append(seq)
        if self.miss is not None:
            out = self.miss.decode_misses(seqs)
            self._take_out(out, report)
            seqs = [seq for seq in seqs if seq not in out]
        for seq in seqs:
            if needs_processing(seq.params):  # never in flight: its step's logits are current
                token, info = seq.sampler.choose(step.logits[seq.slot])
            else:
                token, info = tokens[seq.slot], None
            self._consume(seq, token, info, report, step.stats)

    def _emit(self, seqs: list[Seq], logits: torch.Tensor, report: StepReport) -> None:
        """Sample each row's next token from `logits` [B, V] and hand it to the row."""
        plain = [i for i, seq in enumerate(seqs) if not needs_processing(seq.params)]
        greedy = logits[plain].argmax(-1).tolist() if plain else []
        tokens: dict[int, tuple[int, TokenLogprobs | None]] = {
            i: (t, None) for i, t in zip(plain, greedy, strict=True)
        }
        for i, seq in enumerate(seqs):
            if i not in tokens:
                tokens[i] = seq.sampler.choose(logits[i])
        for i, seq in enumerate(seqs):
            token, info = tokens[i]
            self._consume(seq, token, info, report)

    def _consume(
        self,
        seq: Seq,
        token: int,
        info: TokenLogprobs | None,
        report: StepReport,
        stats: torch.Tensor | None = None,
    ) -> None:
        if seq.sink.cancelled:
            self._end(seq, "cancelled", report)
            return
        seq.generated += 1
        seq.last = token
        if info is not None:
            on_token = getattr(seq.sink, "on_token", None)
            if on_token is not None:
                on_token(info)
        delta = seq.stream.push(token)
        if not seq.stream.finished and seq.generated >= seq.params.max_tokens:
            delta += seq.stream.finish("length")
        if delta:
            seq.sink.on_delta(delta, seq.generated)
        if seq.stream.finished:
            self._end(seq, seq.stream.finish_reason or "stop", report, stats)

    def warm_prefill(self, ids: list[int], pattern: str | None) -> None:
        """Prefill (and a few decode steps) of every chunk-shape family the compiled layers
        meet in serving, so that none compiles under a request. torch.compile specializes a
        size-1 dimension (one row is not many rows), and guards split the forward's positions
        B·S into ranges: the experts' kernel-or-grouped choice (T·k routed pairs against the
        expert count) and, on CUDA, inductor's padded-matmul choice (2048 positions). So one
        row and several rows each run a short chunk, a 256-position one and the widest forward
        the chunker forms (up to `prefill_tokens` positions, as many rows as slots allow).
        `ids`: a prompt (repeated if shorter than two)."""
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        ids = ids if len(ids) >= 2 else ids * 2
        room = max(2, self.max_len - params.max_tokens)  # the longest prompt that fits

        def prompt(n: int) -> list[int]:
            return (ids * (n // len(ids) + 1))[: max(2, min(n, room))]

        def widest(b: int) -> int:  # S of the widest [b, S] forward
            return max(2, min(room, self.prefill_tokens // b))

        short, mid = ids[:2], min(256, self.max_len // 2)
        families = [[ids], [prompt(mid)], [prompt(self.prefill_tokens)]]
        if self.slots > 1:  # several rows: the first (longest) sets S, the others are padded
            rows = max(range(2, self.slots + 1), key=lambda b: b * widest(b))
            families += [[short, short], [prompt(min(mid, widest(2))), ids]]
            families.append([prompt(widest(rows))] + [short] * (rows - 1))
        by_shape = {(len(f), len(f[0])): f for f in families}  # [B, S] of the first forward
        for family in by_shape.values():
            self.run([(NullSink(), x, params, pattern) for x in family])

    def run(self, rows: Sequence[tuple[RowSink, list[int], SamplingParams, str | None]]) -> None:
        """Decode `rows` to completion (tests, benchmarks): admit as slots free up."""
        waiting = list(rows)
        while waiting or self.active():
            while waiting and self.free():
                sink, prompt, params, pattern = waiting.pop(0)
                self.add(sink, prompt, params, pattern)
            self.step()
