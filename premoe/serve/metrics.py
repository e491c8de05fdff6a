"""Prometheus metrics of the server, written by hand in the text exposition format (0.0.4).

A tiny registry of counters, gauges and histograms with labels, thread-safe (the decode worker
and the HTTP handlers update them from different threads), and `ServeMetrics`, the set the server
exports at `GET /metrics`:

==========================================  =========  =============================================
metric                                      type       labels
==========================================  =========  =============================================
premoe_requests_total                       counter    task, endpoint, status (ok/error/cancelled)
premoe_request_errors_total                 counter    code (HTTP status), type
premoe_prompt_tokens_total                  counter    task
premoe_generated_tokens_total               counter    task
premoe_swaps_total                          counter    -
premoe_swap_experts_moved_total             counter    -
premoe_swap_bytes_total                     counter    -
premoe_swap_seconds_total                   counter    -
premoe_batches_total                        counter    task
premoe_resident_bytes                       gauge      - (device bytes of the resident model)
premoe_resident_pattern                     gauge      task (1 for the resident pattern, else 0)
premoe_patterns_mixed                       gauge      - (1: union resident, mixed; 0: swapped)
premoe_kv_cache_bytes                       gauge      - (bytes of the KV cache slots)
premoe_queue_depth                          gauge      - (requests waiting for a batch)
premoe_running_requests                     gauge      - (requests in the running batch)
premoe_request_latency_seconds              histogram  task (arrival to last token)
premoe_time_to_first_token_seconds          histogram  task
premoe_queue_wait_seconds                   histogram  task (arrival to start of its batch)
premoe_batch_size                           histogram  -
premoe_decode_step_seconds                  histogram  - (one token for the whole batch)
premoe_steps_total                          counter    mode (mixed: rows of several patterns in
                                                       one step; single: one pattern)
premoe_step_patterns                        gauge      - (patterns in the last decode step)
premoe_prefill_steps_total                  counter    - (steps that prefilled prompt tokens)
premoe_prefill_step_tokens                  histogram  - (prompt tokens prefilled in one step)
premoe_prefill_step_seconds                 histogram  - (a step's prefill forward, first samples)
premoe_engine_busy_seconds_total            counter    - (continuous scheduler's steps; the rest of
                                                       the time it waited for requests)
premoe_dropped_mass                         histogram  task (a request's mean dropped mass over its
                                                       generated tokens; the pattern at its end)
premoe_reroutes_total                       counter    from, to (pattern switches of --miss-policy
                                                       reroute)
premoe_gc_pause_seconds                     histogram  generation (passes of Python's cyclic GC;
                                                       every thread waits; 2: full passes)
==========================================  =========  =============================================
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TypeVar

LabelValues = tuple[str, ...]
M = TypeVar("M", bound="_Metric")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
PREFILL_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192)
MASS_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def _labels(self, key: LabelValues, extra: str = "") -> str:
        parts = [f'{n}="{_escape(v)}"' for n, v in zip(self.labelnames, key, strict=True)]
        if extra:
            parts.append(extra)
        return "{" + ",".join(parts) + "}" if parts else ""

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class _Value(_Metric):
    """One float per label set (counters and gauges)."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[LabelValues, float] = {}
        if not self.labelnames:
            self._values[()] = 0.0

    def _add(self, amount: float, labels: dict[str, str]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [*self.header(), *(f"{self.name}{self._labels(k)} {_fmt(v)}" for k, v in items)]


class Counter(_Value):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self._add(amount, labels)


class Gauge(_Value):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self._add(-amount, labels)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> None:
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets)) + (math.inf,)
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * len(self.buckets))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
                    break
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        with self._lock:
            return sum(self._counts.get(self._key(labels), []))

    def sum(self, **labels: str) -> float:
        with self._lock:
            return self._sums.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, list(v), self._sums[k]) for k, v in self._counts.items())
        for key, counts, total in items:
            running = 0
            for bound, c in zip(self.buckets, counts, strict=True):
                running += c
                le = 'le="' + _fmt(bound) + '"'
                lines.append(f"{self.name}_bucket{self._labels(key, le)} {running}")
            lines.append(f"{self.name}_sum{self._labels(key)} {_fmt(total)}")
            lines.append(f"{self.name}_count{self._labels(key)} {running}")
        return lines


class Registry:
    """An ordered set of metrics, rendered together."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: M) -> M:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


class ServeMetrics:
    """Every metric `premoe serve` exports (see the module docstring)."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.add(
            Counter(
                "premoe_requests_total",
                "Generation requests finished, by pattern, endpoint and outcome.",
                ("task", "endpoint", "status"),
            )
        )
        self.errors = r.add(
            Counter(
                "premoe_request_errors_total",
                "Requests answered with an error, by HTTP status and error type.",
                ("code", "type"),
            )
        )
        self.prompt_tokens = r.add(
            Counter("premoe_prompt_tokens_total", "Prompt tokens processed, by pattern.", ("task",))
        )
        self.generated_tokens = r.add(
            Counter("premoe_generated_tokens_total", "Tokens generated, by pattern.", ("task",))
        )
        self.swaps = r.add(Counter("premoe_swaps_total", "Expert-set swaps between patterns."))
        self.swap_experts = r.add(
            Counter("premoe_swap_experts_moved_total", "Experts copied into resident slots.")
        )
        self.swap_bytes = r.add(
            Counter("premoe_swap_bytes_total", "Bytes written into resident expert slots.")
        )
        self.swap_seconds = r.add(
            Counter("premoe_swap_seconds_total", "Wall time spent swapping expert sets.")
        )
        self.batches = r.add(
            Counter("premoe_batches_total", "Decode batches run, by pattern.", ("task",))
        )
        self.resident_bytes = r.add(
            Gauge("premoe_resident_bytes", "Bytes of the resident (pruned) model on the device.")
        )
        self.resident_pattern = r.add(
            Gauge(
                "premoe_resident_pattern",
                "1 for the pattern whose experts are resident, 0 for the others.",
                ("task",),
            )
        )
        self.patterns_mixed = r.add(
            Gauge(
                "premoe_patterns_mixed",
                "1: the patterns' union is resident and rows of several patterns share a step "
                "(mixed mode); 0: one pattern resident, swapped between patterns.",
            )
        )
        self.kv_cache_bytes = r.add(
            Gauge("premoe_kv_cache_bytes", "Bytes of the KV cache slots (continuous scheduler).")
        )
        self.queue_depth = r.add(
            Gauge("premoe_queue_depth", "Requests waiting for a batch (routed or not).")
        )
        self.running = r.add(
            Gauge("premoe_running_requests", "Requests in the batch being decoded.")
        )
        self.latency = r.add(
            Histogram(
                "premoe_request_latency_seconds",
                "Request latency, arrival to last token, by pattern.",
                ("task",),
                LATENCY_BUCKETS,
            )
        )
        self.ttft = r.add(
            Histogram(
                "premoe_time_to_first_token_seconds",
                "Arrival to first generated token, by pattern.",
                ("task",),
                LATENCY_BUCKETS,
            )
        )
        self.queue_wait = r.add(
            Histogram(
                "premoe_queue_wait_seconds",
                "Arrival to the start of the request's batch, by pattern.",
                ("task",),
                LATENCY_BUCKETS,
            )
        )
        self.batch_size = r.add(
            Histogram("premoe_batch_size", "Requests per decode batch.", (), BATCH_BUCKETS)
        )
        self.step_seconds = r.add(
            Histogram(
                "premoe_decode_step_seconds",
                "Wall time of one decode step (one token for every row of the batch).",
                (),
                STEP_BUCKETS,
            )
        )

        self.steps = r.add(
            Counter(
                "premoe_steps_total",
                "Decode steps of the continuous scheduler, by mode: mixed (rows of several "
                "patterns, per-row router masks) or single (one pattern).",
                ("mode",),
            )
        )
        self.step_patterns = r.add(
            Gauge("premoe_step_patterns", "Patterns among the rows of the last decode step.")
        )
        self.prefill_steps = r.add(
            Counter("premoe_prefill_steps_total", "Steps that prefilled prompt tokens.")
        )
        self.prefill_seconds = r.add(
            Histogram(
                "premoe_prefill_step_seconds",
                "Wall time of one step's prefill forward, its first tokens sampled.",
                (),
                STEP_BUCKETS,
            )
        )
        self.busy_seconds = r.add(
            Counter(
                "premoe_engine_busy_seconds_total",
                "Wall time of the continuous scheduler's steps (prefill and decode); the rest "
                "of the engine's time it waited for requests.",
            )
        )
        self.prefill_step_tokens = r.add(
            Histogram(
                "premoe_prefill_step_tokens",
                "Prompt tokens prefilled in one step (bounded by --prefill-tokens).",
                (),
                PREFILL_BUCKETS,
            )
        )

        self.dropped_mass = r.add(
            Histogram(
                "premoe_dropped_mass",
                "Per request: mean share of the full router's top-k weight on experts its "
                "pattern does not hold, over its generated tokens (by the pattern at its end).",
                ("task",),
                MASS_BUCKETS,
            )
        )
        self.reroutes = r.add(
            Counter(
                "premoe_reroutes_total",
                "Pattern switches of running requests (--miss-policy reroute).",
                ("from", "to"),
            )
        )

        self.gc_pause = r.add(
            Histogram(
                "premoe_gc_pause_seconds",
                "Passes of Python's cyclic garbage collector, by generation (2: full passes); "
                "every thread of the server waits for one.",
                ("generation",),
                STEP_BUCKETS,
            )
        )

        self.gc_pauses = GcPauses(self.gc_pause)

    def render(self) -> str:
        self.gc_pauses.drain()
        return self.registry.render()


class GcPauses:
    """Times the cyclic garbage collector's passes for a `premoe_gc_pause_seconds` histogram
    while installed (gc.callbacks is process-wide: `install` once, `remove` when done). A pass
    may start in any thread, even one holding a metric's lock, so the callback only appends;
    `drain` moves the times into the histogram."""

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self._t0: float | None = None  # the pass running now (passes never overlap)
        self._done: deque[tuple[int, float]] = deque()

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self._done.append((info["generation"], time.perf_counter() - self._t0))
            self._t0 = None

    def drain(self) -> None:
        while self._done:
            gen, seconds = self._done.popleft()
            self.histogram.observe(seconds, generation=str(gen))

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
