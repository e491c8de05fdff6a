"""What the engine serves and how it talks to its callers: the engine's configuration
(`EngineConfig`, what `premoe serve` builds from its options), a request in flight
(`GenRequest`: its queue of events to the HTTP layer), its routing (`RouteInfo`) and the one
error type requests fail with (`RequestError`, mapped to an OpenAI error body and status)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from premoe.errors import UsageError
from premoe.load.decode import DEFAULT_REROUTE_THRESHOLD, DEFAULT_WINDOW, check_policy
from premoe.load.loader import ExpertQuantization
from premoe.load.miss import DroppedMass
from premoe.prune import KeepSets
from premoe.serve.decode import (
    SamplingParams,
)
from premoe.serve.sampling import TokenLogprobs

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Everything `premoe serve` needs; `create_app(EngineConfig(...))` serves it.

    `store` + (`keep` or `budget`) give the patterns; alternatively pass `patterns` (name ->
    KeepSets) directly and no store is read (requests must then name a pattern, or get
    `default_task`).
    """

    model: str
    store: str | None = None
    keep: int | None = None
    budget: str | None = None
    metric: str | None = None
    allocation: str = "uniform"  # uniform (K per layer) | nonuniform (same total, by layer)
    patterns: Mapping[str, KeepSets] | None = None
    default_task: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 8
    max_wait_ms: float = 200.0
    max_model_len: int | None = None
    max_queue: int = 256
    cache: str = "auto"  # auto | dynamic | static
    compile: str = "auto"  # auto | none | default | reduce-overhead
    warmup: bool | None = None  # None: when compiling
    experts_implementation: str | None = None  # None: grouped_mm on CUDA, transformers' default
    served_model_name: str | None = None
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    route_threshold: float | None = None  # passed to the router when it takes one
    host_cache: str | None = None  # e.g. "32GiB": every pattern's experts held in host memory
    decode_buckets: tuple[int, ...] | None = None  # static cache batch sizes (default 1,2,4..)
    scheduler: str = "auto"  # auto (continuous where supported) | continuous | batch
    mixed: str = "auto"  # auto (when the union of the patterns fits) | on | off
    prefill_tokens: int = 512  # prompt positions [B, S] per prefill forward at most (stall bound)
    pipeline: bool = True  # launch a decode step before reading the last one's (CUDA graphs)
    kv_memory_fraction: float = 0.9  # without --budget: share of free memory the engine may take
    min_kv_slots: int = 4  # KV slots that must fit beside the weights (mixed mode: the union)
    quantize: ExpertQuantization | None = None  # experts resident quantized (fp8 / int4)
    calibrated_routers: bool | None = None  # None: the store's calibrated routers, if any
    meter: bool = True  # dropped mass per request (continuous scheduler; miss.py)
    # after warm-up, gc.freeze() what start-up allocated (the model, compiled graphs: 10^5-10^6
    # objects), so that the cyclic GC's full collections stop walking it (a pause of every step
    # and stream, 0.2 s for the CPU demo); process-wide, undone by Engine.stop()
    freeze_gc: bool = True
    miss_policy: str = "mask"  # mask | reroute (fetch: `premoe generate` only)
    miss_window: int = DEFAULT_WINDOW  # tokens per reroute check
    miss_threshold: float = DEFAULT_REROUTE_THRESHOLD  # windowed dropped mass that reroutes

    def check(self) -> None:
        if self.keep is not None and self.budget is not None:
            raise UsageError("give --keep or --budget, not both")
        if self.store is None and self.patterns is None:
            raise UsageError("give a pattern store (--store) made by `premoe profile`")
        if self.max_batch < 1 or self.max_batch > 1024:
            raise UsageError(f"--max-batch must be between 1 and 1024, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise UsageError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise UsageError(f"--max-model-len must be >= 2, got {self.max_model_len}")
        if self.max_queue < 1:
            raise UsageError(f"--max-queue must be >= 1, got {self.max_queue}")
        if self.cache not in ("auto", "dynamic", "static"):
            raise UsageError(f"--cache must be auto, dynamic or static, got {self.cache!r}")
        if self.compile not in ("auto", "none", "default", "reduce-overhead"):
            raise UsageError(
                f"--compile must be auto, none, default or reduce-overhead, got {self.compile!r}"
            )
        if self.max_body_bytes < 1024:
            raise UsageError("the body size limit must be at least 1 KiB")
        if self.scheduler not in ("auto", "continuous", "batch"):
            raise UsageError(
                f"--scheduler must be auto, continuous or batch, got {self.scheduler!r}"
            )
        if self.allocation not in ("uniform", "nonuniform"):
            raise UsageError(f"--allocation must be uniform or nonuniform, got {self.allocation!r}")
        if self.mixed not in ("auto", "on", "off"):
            raise UsageError(f"--mixed must be auto, on or off, got {self.mixed!r}")
        if self.min_kv_slots < 1:
            raise UsageError(f"--min-kv-slots must be >= 1, got {self.min_kv_slots}")
        if not 0 < self.kv_memory_fraction <= 1:
            raise UsageError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if self.prefill_tokens < 1:
            raise UsageError(f"--prefill-tokens must be >= 1, got {self.prefill_tokens}")
        check_policy(self.miss_policy, self.miss_window, self.miss_threshold)
        if self.miss_policy == "fetch":
            raise UsageError(
                "--miss-policy fetch is available in `premoe generate` only: rows of a served "
                "batch share the resident expert slots, so fetching one row's missing experts "
                "would evict another's; use mask or reroute"
            )


class RequestError(Exception):
    """A request the server refuses: HTTP status + OpenAI error fields."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code


@dataclass(frozen=True)
class RouteInfo:
    """Which pattern serves a request, and why."""

    task: str
    similarity: float | None = None
    fallback: bool = False
    routed: bool = True  # False: the request named its pattern

    def as_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "similarity": self.similarity,
            "fallback": self.fallback,
            "routed": self.routed,
        }


RouteFn = Callable[[str], RouteInfo]


class _Mailbox:
    """Events from the worker thread to one event loop. A burst of posts (the rows of one
    decode step) wakes the loop once: `call_soon_threadsafe` per event writes to the loop's
    wake-up pipe and runs a callback for every one of them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue[Any], item: Any) -> None:
        """Put `item` on `queue` (of `loop`) soon; RuntimeError when the loop is closed."""
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            with self._lock:
                self._scheduled = False
            raise

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = (
    weakref.WeakKeyDictionary()
)
_MAILBOXES_LOCK = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _MAILBOXES_LOCK:
        box = _MAILBOXES.get(loop)
        if box is None:
            box = _MAILBOXES[loop] = _Mailbox(loop)
        return box


_ids = itertools.count()


class GenRequest:
    """One generation request: the worker's row sink and the handler's event stream.

    Events (in order): ("route", RouteInfo), then any number of ("delta", text), then exactly
    one of ("finish", reason) or ("error", RequestError). A cancelled request gets no more
    events.
    """

    def __init__(
        self,
        engine: Any,  # the `premoe.serve.engine.Engine` that owns it
        prompt_ids: list[int],
        prompt_text: str,
        params: SamplingParams,
        task: str | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.engine = engine
        self.id = f"{next(_ids):x}-{uuid.uuid4().hex[:12]}"
        self.prompt_ids = prompt_ids
        self.prompt_text = prompt_text
        self.params = params
        self.requested_task = task
        self.route: RouteInfo | None = None
        self.arrival = time.monotonic()
        self.started: float | None = None
        self.first_token: float | None = None
        self.finished: float | None = None
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._cancelled = False
        self._ended = False
        self._lock = threading.Lock()
        self._mailbox = _mailbox(loop)  # the worker's events to the handler's loop
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.served_keep: KeepSets | None = None  # the keep sets it was decoded with
        self.logprobs: list[TokenLogprobs] = []  # one per generated token, when asked
        self.dropped_mass: DroppedMass | None = None  # over its generated tokens, when metered
        self.switches: list[Any] = []  # `premoe.serve.miss.Reroute`s, in order
        self.resume: Any = None  # its decoder row, while it waits to continue (a reroute)

    # -- scheduler protocol ----------------------------------------------------------------------
    @property
    def task(self) -> str:
        assert self.route is not None
        return self.route.task

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    # -- events (worker thread -> event loop) ----------------------------------------------------
    def _push(self, kind: str, value: Any) -> None:
        try:
            self._mailbox.post(self._events, (kind, value))
        except RuntimeError:  # the event loop is gone (shutdown)
            self._cancelled = True

    def set_route(self, route: RouteInfo) -> None:
        self.route = route
        self._push("route", route)

    def on_start(self) -> None:
        self.started = time.monotonic()
        self.engine.metrics.queue_wait.observe(self.started - self.arrival, task=self.task)

    def on_token(self, info: TokenLogprobs) -> None:
        self.logprobs.append(info)

    def on_delta(self, text: str, completion_tokens: int) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()
            self.engine.metrics.ttft.observe(self.first_token - self.arrival, task=self.task)
        self.completion_tokens = completion_tokens
        self._push("delta", text)

    def _close(self) -> bool:
        """Mark the request ended; False when it had ended already (one terminal event)."""
        with self._lock:
            if self._ended:
                return False
            self._ended = True
        self.engine._forget(self)
        return True

    def on_finish(self, reason: str, completion_tokens: int) -> None:
        m = self.engine.metrics
        m.generated_tokens.inc(completion_tokens, task=self.task)
        self.completion_tokens = completion_tokens
        if reason == "cancelled":  # the client left; nobody reads events any more
            self._close()
            return
        if not self._close():
            return
        self.finished = time.monotonic()
        self.finish_reason = reason
        m.latency.observe(self.finished - self.arrival, task=self.task)
        self._push("finish", reason)

    def fail(self, error: RequestError) -> None:
        if not self._close():
            return
        self.finished = time.monotonic()
        self._cancelled = True  # the worker stops decoding it
        self._push("error", error)

    def cancel(self) -> None:
        """The client left: stop decoding this request, free its place."""
        if not self._cancelled and self.finished is None:
            self._cancelled = True
            self._close()
            self.engine._cancelled(self)

    async def next_event(self) -> tuple[str, Any]:
        return await self._events.get()

    async def next_events(self) -> list[tuple[str, Any]]:
        """The next events, at least one: every event waiting, consecutive deltas joined into
        one. Under load the event loop falls behind the decoder; a chunk per token would then
        cost it more per token than the decoder spends."""
        events = [await self._events.get()]
        while not self._events.empty():
            kind, value = self._events.get_nowait()
            if kind == "delta" and events[-1][0] == "delta":
                events[-1] = ("delta", events[-1][1] + value)
            else:
                events.append((kind, value))
        return events
