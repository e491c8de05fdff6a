"""Batched generation on one resident model: left-padded prefill, then token-by-token decode.

Shape legend: B rows in the batch (Bp after padding to a bucket), P padded prompt length, L KV
length (the static cache's `max_len`, or the tokens seen so far with a dynamic cache), V vocab.

How a batch runs:

1. Prefill. Prompts are left-padded to P; the attention mask is built here as a 4-D additive mask
   `[Bp, 1, P, L]` (causal AND key-is-a-real-token), and position ids count real tokens only
   (`cumsum(mask) - 1`), so every row computes exactly what it would alone. Only the last
   position's logits are kept.
2. Decode. One token per row per step with the KV cache; the mask `[Bp, 1, 1, L]` comes from a
   per-row key-validity tensor `[Bp, L]` updated in place. Rows finish independently (end of
   sequence, a stop string, max_tokens, or the client leaving); the batch ends when all have.
3. Sampling per row: greedy (argmax) at temperature 0, else temperature + top-p with the row's
   own `torch.Generator` (seeded by the request's `seed`).

Two cache modes. `dynamic` (CPU default): a `DynamicCache`, eager. `static` (CUDA default): one
`StaticCache` of `max_len` per batch bucket (1, 2, 4, ... up to max_batch; a batch is padded to
its bucket with copies of row 0, which route to the same experts and so cost no extra expert
reads), and the decode step optionally `torch.compile`d (`mode="reduce-overhead"` captures CUDA
graphs). Expert swaps write into the same tensors (invariant 5), so graphs stay valid; warm-up
happens once per bucket, not per request.

The masks are built here rather than by transformers, so the same code runs on transformers
5.17 (argument `past_key_values`) and later (argument `cache`).

One module because the compiled static-cache decoder, its CUDA-graph thread state and its
bucketed prefill share the buffers that the captured graphs point at.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

log = logging.getLogger(__name__)

CacheMode = Literal["dynamic", "static"]
CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"]


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation (sampling.py applies the fields below `seed`; the
    batch decoder here supports only those above it)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )

    @property
    def basic(self) -> bool:
        """Only the fields the batch decoder implements."""
        return (
            self.top_k in (0, -1)
            and self.min_p == 0.0
            and not self.penalized
            and self.logprobs is None
            and not self.stop_token_ids
        )


class RowSink(Protocol):
    """Where a row's output goes (the engine's request object)."""

    @property
    def cancelled(self) -> bool: ...

    def on_delta(self, text: str, completion_tokens: int) -> None: ...

    def on_finish(self, reason: str, completion_tokens: int) -> None: ...


# ---- text: incremental detokenization and stop strings ------------------------------------------


def _decode_stream(tokenizer: Any) -> Any:
    """A `tokenizers` DecodeStream for `tokenizer` when its decode is the Rust tokenizer's
    alone (a fast tokenizer without transformers' space clean-up), else None."""
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers < 0.21
        return None
    return DecodeStream(skip_special_tokens=True)


class TextStream:
    """Turns generated token ids into text deltas, holding back what may become a stop string.

    Incremental decoding keeps a window of the last ids (as TGI/vLLM do) so that tokenizers whose
    decode depends on context (leading spaces, multi-byte characters split over tokens) give
    the same text as decoding all ids at once. A fast tokenizer does this in Rust (`tokenizers`'
    DecodeStream: one call per token; the window in Python decodes twice per token, about 20x
    the time); others decode the window here. The end of a row decodes all its ids once, so
    what a stream still held back (an incomplete character) comes out as a full decode gives it.
    Text that could be the start of a stop string is not emitted until it is known not to be
    one; a stop string ends the row and is not returned.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.eos_ids = eos_ids
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self._prefix = 0
        self._read = 0
        self._stream = _decode_stream(tokenizer)
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _incremental(self, final: bool = False) -> str:
        """The text that the ids added since the last call bring (`final`: even an incomplete
        character)."""
        if self._stream is not None:
            if not final:
                try:
                    return self._stream.step(self._backend, self.ids[-1]) or ""
                except Exception:  # stray bytes made its prefix unstable: the window from here
                    self._stream = None
            # what the stream held back: the full decode's text past ours
            self._read = len(self.ids)
            self._prefix = max(0, self._read - 6)
            return self._decode(self.ids)[len(self.text) :]
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            delta = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            return delta
        return ""

    def _held_back(self) -> int:
        """Chars at the end of `text` that are a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, end: int) -> str:
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out

    def push(self, token: int) -> str:
        """Add one generated token; return the text that may be emitted now."""
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self.flush()
        self.ids.append(token)
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += self._incremental()
        if self.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.finish_reason = "stop"
                return self._take(len(self.text))
            return self._take(len(self.text) - self._held_back())
        return self._take(len(self.text))

    def flush(self) -> str:
        """Everything not yet emitted (the row ends without a stop string)."""
        self.text += self._incremental(final=True)
        return self._take(len(self.text))

    def finish(self, reason: str) -> str:
        out = self.flush() if reason != "stop" else ""
        self.finish_reason = reason
        return out


# ---- rows ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class DecodeRow:
    prompt_ids: list[int]
    params: SamplingParams
    sink: RowSink
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    generated: int = 0
    done: bool = False


@dataclass
class DecodeStats:
    """Where the time goes, summed over batches (seconds)."""

    batches: int = 0
    rows: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    step_launch_s: float = 0.0  # host time to issue a decode step (all of it on CPU)
    step_wait_s: float = 0.0  # sampling and waiting for the device (the sync point)
    host_s: float = 0.0  # detokenization, stop strings, emitting
    warmup_s: float = 0.0
    per_bucket_compiles: dict[int, float] = field(default_factory=dict)


class NullSink:
    """A row sink that discards the text (warm-up, benchmarks)."""

    cancelled = False

    def on_delta(self, text: str, completion_tokens: int) -> None:
        pass

    def on_finish(self, reason: str, completion_tokens: int) -> None:
        pass


def _forward_cache_kwarg(model: Any) -> str:
    """`cache` (transformers >= 5.2x) or `past_key_values` (5.17)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def last_logits(
    model: Any,
    ids: torch.Tensor,  # [B, S]
    positions: torch.Tensor,  # [B, S]
    mask: torch.Tensor,  # [B, 1, S, K] additive
    cache_kw: str,
    cache: Any,
) -> torch.Tensor:
    """The model's last-position logits [B, V] (float32) of one forward that fills `cache`."""
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kw: cache},
    )
    return out.logits[:, -1, :].float()


def buckets_for(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


class BatchDecoder:
    """Runs batches of rows on `model` (already on its device, in eval mode)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch: int,
        max_len: int,
        cache: CacheMode = "dynamic",
        compile: CompileMode = "none",
        eos_ids: set[int] | None = None,
        pad_id: int | None = None,
        buckets: Sequence[int] | None = None,
        compile_dynamic: bool = False,
        pipelined: bool | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_len = max_len
        self.cache_mode: CacheMode = cache
        self.compile_mode: CompileMode = compile
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.min_value = torch.finfo(self.dtype).min
        self.eos_ids = eos_ids if eos_ids is not None else _eos_ids(model, tokenizer)
        if pad_id is None:
            pad_id = tokenizer.pad_token_id
            if pad_id is None:
                pad_id = next(iter(self.eos_ids), 0)
        self.pad_id = int(pad_id)
        if buckets is not None:
            wanted = {int(b) for b in buckets if 1 <= int(b) < max_batch}
            self.buckets = sorted(wanted | {max_batch})
        else:
            self.buckets = buckets_for(max_batch)
        if cache != "static":
            self.buckets = []
        self.compile_dynamic = compile_dynamic
        # overlap host work on step k with the device computing step k+1 (CUDA default)
        self.pipelined = self.device.type == "cuda" if pipelined is None else pipelined
        self._cache_kw = _forward_cache_kwarg(model)
        self._static: dict[int, Any] = {}  # bucket -> StaticCache
        self._steps: dict[int, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}
        self._compiled_ok = True
        self.stats = DecodeStats()
        if compile != "none":
            dyn = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dyn, name):
                    setattr(dyn, name, max(getattr(dyn, name), len(self.buckets) + 4))

    # -- caches and the decode step --------------------------------------------------------------
    def _bucket(self, n: int) -> int:
        if self.cache_mode != "static":
            return n
        return next(b for b in self.buckets if b >= n)

    def _cache_for(self, bp: int) -> Any:
        if self.cache_mode == "dynamic":
            from transformers import DynamicCache

            return DynamicCache(config=self.model.config)
        cache = self._static.get(bp)
        if cache is None:
            from transformers import StaticCache

            cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
            self._static[bp] = cache
        else:
            cache.reset()
        return cache

    def _make_step(self, cache: Any) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        model, kw, min_value, dtype = self.model, self._cache_kw, self.min_value, self.dtype

        def step(
            input_ids: torch.Tensor,  # [Bp, 1]
            position_ids: torch.Tensor,  # [Bp, 1]
            valid: torch.Tensor,  # [Bp, L] bool
        ) -> tuple[torch.Tensor, torch.Tensor]:
            zero = torch.zeros((), dtype=dtype, device=valid.device)
            mask = torch.where(valid, zero, min_value)[:, None, None, :]  # [Bp, 1, 1, L]
            out = model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                **{kw: cache},
            )
            logits = out.logits[:, -1, :].float()  # [Bp, V]
            return logits, logits.argmax(-1)

        return step

    def _step_for(self, bp: int, cache: Any) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        if self.cache_mode == "dynamic":
            return self._make_step(cache)
        step = self._steps.get(bp)
        if step is None:
            step = self._make_step(cache)
            if self.compile_mode != "none" and self._compiled_ok:
                step = torch.compile(
                    step,
                    mode=self.compile_mode,
                    fullgraph=False,
                    dynamic=None if self.compile_dynamic else False,
                )
            self._steps[bp] = step
        return step

    def disable_compile(self) -> None:
        """Fall back to the eager decode step (after a compilation failure)."""
        self._compiled_ok = False
        self.compile_mode = "none"
        self._steps.clear()

    def _adopt_thread(self) -> None:
        """Make the calling thread able to capture and replay CUDA graphs (`generate` calls it:
        whichever thread decodes).

        torch keeps its CUDA-graph trees in thread-local state. torch 2.11 sets that state up
        only in the thread that first imported `torch._inductor.cudagraph_trees`, and a
        'reduce-overhead' step run from any other plain thread fails with a bare AssertionError
        (seen with a second Engine in one process, i.e. a second worker thread); torch 2.13 sets
        it up on demand. Where it is present this does nothing."""
        if self.compile_mode != "reduce-overhead":
            return
        trees = importlib.import_module("torch._inductor.cudagraph_trees")
        if hasattr(trees.local, "tree_manager_containers"):
            return
        trees.local.tree_manager_containers = {}
        trees.local.tree_manager_locks = defaultdict(threading.Lock)
        torch._C._stash_obj_in_tls("tree_manager_containers", trees.local.tree_manager_containers)
        torch._C._stash_obj_in_tls("tree_manager_locks", trees.local.tree_manager_locks)

    # -- warm-up ---------------------------------------------------------------------------------
    def warmup(self, buckets: Sequence[int] | None = None, steps: int = 4) -> float:
        """Run every bucket once so that compilation and graph capture happen now (seconds)."""
        t0 = time.perf_counter()
        ids = self.tokenizer("warm up", add_special_tokens=True)["input_ids"][:8] or [self.pad_id]
        for b in buckets if buckets is not None else (self.buckets or [1]):
            tb = time.perf_counter()
            rows = [
                DecodeRow(list(ids), SamplingParams(max_tokens=steps), NullSink()) for _ in range(b)
            ]
            self.generate(rows, ignore_eos=True)  # EOS must not end warm-up early
            self.stats.per_bucket_compiles[b] = time.perf_counter() - tb
        took = time.perf_counter() - t0
        # the counters start afresh; warm-up time and compile times are kept
        self.stats = DecodeStats(
            warmup_s=self.stats.warmup_s + took,
            per_bucket_compiles=self.stats.per_bucket_compiles,
        )
        return took

    # -- sampling --------------------------------------------------------------------------------
    def _sample(
        self, rows: Sequence[DecodeRow], logits: torch.Tensor, greedy: torch.Tensor
    ) -> torch.Tensor:
        """Next token of every padded row, on the device ([Bp])."""
        sampled = [i for i, r in enumerate(rows) if not r.done and not r.params.greedy]
        if not sampled:
            return greedy
        out = greedy.clone()
        for i in sampled:
            p = rows[i].params
            x = logits[i] / p.temperature  # [V]
            probs = torch.softmax(x, dim=-1)
            if p.top_p < 1.0:
                sp, idx = probs.sort(descending=True)
                keep = (sp.cumsum(-1) - sp) < p.top_p  # always keeps the top token
                sp = sp * keep
                choice = torch.multinomial(sp / sp.sum(), 1, generator=rows[i].generator)
                out[i] = idx[choice[0]]
            else:
                out[i] = torch.multinomial(probs, 1, generator=rows[i].generator)[0]
        return out

    def _generator(self, seed: int | None) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed)
        return g

    # -- the batch -------------------------------------------------------------------------------
    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len + max_tokens > self.max_len:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context "
                f"window of {self.max_len} tokens"
            )

    def _next_tokens(
        self,
        rows: Sequence[DecodeRow],
        logits: torch.Tensor,  # [Bp, V]
        greedy: torch.Tensor,  # [Bp]
        bp: int,
        n: int,
    ) -> torch.Tensor:
        """Tokens to feed next ([Bp], our own tensor: graph outputs get overwritten)."""
        out = self._sample(rows, logits, greedy)
        out = out.clone() if out is greedy else out
        if bp > n:
            out[n:] = out[0]  # padding rows follow row 0
        return out

    def _launch(
        self,
        step_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        rows: Sequence[DecodeRow],
        nxt: torch.Tensor,  # [Bp]
        state: _LoopState,
        bp: int,
        n: int,
    ) -> torch.Tensor:
        """Issue one decode step for `nxt`; returns the following tokens (on the device)."""
        if self.cache_mode == "static":
            state.valid[:, state.col] = True
        else:
            ones = torch.ones((bp, 1), dtype=torch.bool, device=state.valid.device)
            state.valid = torch.cat([state.valid, ones], 1)  # [Bp, L + 1]
        if self.compile_mode == "reduce-overhead" and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        logits, greedy = step_fn(nxt[:, None], state.next_pos, state.valid)
        state.next_pos = state.next_pos + 1
        state.col += 1
        self.stats.decode_steps += 1
        return self._next_tokens(rows, logits, greedy, bp, n)

    def _consume(self, rows: Sequence[DecodeRow], tokens: list[int]) -> int:
        """Hand one token to every live row; returns how many rows are still live."""
        live = 0
        for i, r in enumerate(rows):
            if r.done:
                continue
            if r.sink.cancelled:
                r.done = True
                r.sink.on_finish("cancelled", r.generated)
                continue
            assert r.stream is not None
            r.generated += 1
            self.stats.generated_tokens += 1
            delta = r.stream.push(tokens[i])
            if not r.stream.finished and r.generated >= r.params.max_tokens:
                delta += r.stream.finish("length")
            if delta:
                r.sink.on_delta(delta, r.generated)
            if r.stream.finished:
                r.done = True
                r.sink.on_finish(r.stream.finish_reason or "stop", r.generated)
            else:
                live += 1
        return live

    @torch.no_grad()
    def generate(
        self,
        rows: Sequence[DecodeRow],
        between_steps: Callable[[], None] | None = None,
        *,
        ignore_eos: bool = False,
    ) -> None:
        """Run `rows` to completion, reporting text through each row's sink.

        `between_steps` is called after every decode step (the engine asserts there that the
        expert set did not change under the batch). With `ignore_eos` every row decodes its
        `max_tokens` (warm-up, benchmarks).
        """
        if not rows:
            return
        self._adopt_thread()
        if len(rows) > self.max_batch:
            raise ValueError(f"batch of {len(rows)} rows exceeds max_batch {self.max_batch}")
        t_start = time.perf_counter()
        dev = self.device
        for r in rows:
            if not r.prompt_ids:
                raise ValueError("empty prompt")
            self.check_fits(len(r.prompt_ids), r.params.max_tokens)
            r.stream = TextStream(
                self.tokenizer,
                r.params.stop,
                set() if ignore_eos or r.params.ignore_eos else self.eos_ids,
            )
            r.generator = None if r.params.greedy else self._generator(r.params.seed)
            r.generated, r.done = 0, False
        n = len(rows)
        bp = self._bucket(n)
        # padding rows copy row 0: same tokens, so they route to the same experts
        prompts = [r.prompt_ids for r in rows] + [rows[0].prompt_ids] * (bp - n)
        plen = max(len(p) for p in prompts)
        steps_max = max(r.params.max_tokens for r in rows)
        kv_len = self.max_len if self.cache_mode == "static" else plen
        ids = torch.full((bp, plen), self.pad_id, dtype=torch.long)  # [Bp, P]
        valid = torch.zeros((bp, kv_len), dtype=torch.bool)  # [Bp, L]
        for i, p in enumerate(prompts):
            ids[i, plen - len(p) :] = torch.tensor(p, dtype=torch.long)
            valid[i, plen - len(p) : plen] = True
        ids, valid = ids.to(dev), valid.to(dev)
        positions = (valid[:, :plen].long().cumsum(-1) - 1).clamp(min=0)  # [Bp, P]
        cache = self._cache_for(bp)
        q = torch.arange(plen, device=dev)
        k = torch.arange(kv_len, device=dev)
        allowed = (k[None, :] <= q[:, None])[None] & valid[:, None, :]  # [Bp, P, L]
        zero = torch.zeros((), dtype=self.dtype, device=dev)
        mask = torch.where(allowed, zero, self.min_value)[:, None]  # [Bp, 1, P, L]
        logits = last_logits(self.model, ids, positions, mask, self._cache_kw, cache)  # [Bp, V]
        greedy = logits.argmax(-1)
        del mask, allowed
        next_pos = positions[:, -1:] + 1  # [Bp, 1]
        t_prefilled = time.perf_counter()
        self.stats.prefill_s += t_prefilled - t_start
        self.stats.prefill_tokens += sum(len(r.prompt_ids) for r in rows)
        self.stats.batches += 1
        self.stats.rows += n

        step_fn = self._step_for(bp, cache) if steps_max > 1 else None
        state = _LoopState(valid=valid, next_pos=next_pos, col=plen)
        nxt = self._next_tokens(rows, logits, greedy, bp, n)  # [Bp] on the device
        del logits, greedy
        pipelined = self.pipelined and step_fn is not None
        host = torch.empty(bp, dtype=torch.long, pin_memory=dev.type == "cuda")
        ready = torch.cuda.Event() if pipelined and dev.type == "cuda" else None  # re-recorded
        for step in range(steps_max):
            last = step == steps_max - 1
            t0 = time.perf_counter()
            upcoming: torch.Tensor | None = None
            if pipelined:
                # copy this step's tokens to the host, launch the next step before reading
                # them: the host work below overlaps the device computing the next token
                host.copy_(nxt, non_blocking=True)
                if ready is not None:
                    ready.record()
                if not last and any(not r.done for r in rows):
                    assert step_fn is not None
                    upcoming = self._launch(step_fn, rows, nxt, state, bp, n)
                t1 = time.perf_counter()
                self.stats.step_launch_s += t1 - t0
                if ready is not None:
                    ready.synchronize()
                tokens = host.tolist()
            else:
                tokens = nxt.tolist()
                t1 = time.perf_counter()
            t2 = time.perf_counter()
            self.stats.step_wait_s += t2 - t1
            live = self._consume(rows, tokens)
            self.stats.host_s += time.perf_counter() - t2
            if between_steps is not None:
                between_steps()
            if live == 0 or step_fn is None or last:
                break
            if pipelined:
                assert upcoming is not None
                nxt = upcoming
            else:
                t3 = time.perf_counter()
                nxt = self._launch(step_fn, rows, nxt, state, bp, n)
                self.stats.step_launch_s += time.perf_counter() - t3
        # a row can only be left undone by a bug or a cancellation; close it for the sink
        for r in rows:
            if not r.done:
                r.done = True
                if not r.sink.cancelled:
                    r.sink.on_finish("length", r.generated)


@dataclass
class _LoopState:
    valid: torch.Tensor  # [Bp, L] which KV positions hold real tokens
    next_pos: torch.Tensor  # [Bp, 1] position id of the next token of every row
    col: int  # KV column the next token is written to


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return {int(i) for i in ids}
