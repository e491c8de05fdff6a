"""The serving engine: one worker thread owns the model; requests are routed, queued per pattern,
batched, and decoded with the pattern's experts resident.

Life of a request:

1. The HTTP handler tokenizes the prompt, checks it against the context window and calls
   `Engine.submit`, which returns a `GenRequest` (an async stream of events).
2. A request that names its pattern (`"premoe": {"task": ...}`) is queued at once; any other is
   routed by the worker: `route(prompt) -> RouteInfo` (TAER on the store's keys), falling back to
   the store's general pattern (`__global__`) when the match is weak or no router is available.
3. Continuous scheduler (default): between decode steps the worker admits waiting requests into
   free KV slots of the `ContinuousDecoder` (continuous.py). Mixed mode (the union of the
   patterns resident, rowmask.py; chosen when it fits the memory allowed, memory.py): oldest
   first, any pattern; every row is masked to its own pattern. Swap mode (one pattern
   resident): the resident pattern's requests; when the `Scheduler` picks another pattern (its
   oldest request waited past `max_wait_ms`, or the resident one has none waiting), admissions
   stop, the running rows finish, and the expert slots are swapped in place
   (`Resident.swap_to`).
   Batch scheduler (`scheduler="batch"`): the `Scheduler` picks the next pattern (batching
   within a pattern, swaps only between batches, a bound on waiting) and `BatchDecoder.generate`
   runs the batch to completion.
4. Invariant: every row is decoded with exactly the keep sets of the pattern it was routed to
   (in mixed mode: the union, masked to them). The worker asserts before every forward that the
   resident keep sets and a swap counter did not change under running rows.

A failing batch (any exception) fails its own requests with a 500 error; the worker keeps
serving. A request whose client leaves is cancelled: dropped from its queue, or, mid-batch, its
row stops being decoded and the batch ends when no live row is left.

One module because the engine is an actor: one worker thread owns the resident model, the
queues and the decoders, and every method here runs on that thread against that state.
Requests and configuration are in `premoe.serve.requests`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

import premoe
from premoe.calibrate.served import PatternRouters, pattern_routers
from premoe.errors import PremoeError, UsageError
from premoe.prune import KeepSets
from premoe.quant import gemv_experts, kernels
from premoe.runtime import resolve_device, resolve_dtype
from premoe.serve import kvcache, memory, rowmask
from premoe.serve import miss as serve_miss
from premoe.serve.continuous import ContinuousDecoder, StepReport
from premoe.serve.decode import (
    BatchDecoder,
    CacheMode,
    CompileMode,
    DecodeRow,
    SamplingParams,
)
from premoe.serve.metrics import ServeMetrics
from premoe.serve.patterns import build_patterns, make_router
from premoe.serve.requests import (  # noqa: F401  (moved; re-exported)
    EngineConfig,
    GenRequest,
    RequestError,
    RouteFn,
    RouteInfo,
)
from premoe.serve.reroute import attach as attach_miss
from premoe.serve.resident import Resident, open_resident
from premoe.serve.scheduler import Scheduler
from premoe.source import load_tokenizer, resolve_model

log = logging.getLogger(__name__)

GLOBAL_PATTERN = "__global__"


def _mean_kept(keep: KeepSets) -> int | float:
    """Experts kept per layer: the count, or for ragged keep sets the mean over layers."""
    mean = sum(len(v) for v in keep.layers.values()) / len(keep.layers)
    return int(mean) if mean == int(mean) else round(mean, 2)


class Engine:
    """Loads the model once and serves generation requests from a worker thread."""

    def __init__(self, config: EngineConfig, router: RouteFn | None = None) -> None:
        config.check()
        self.config = config
        self.metrics = ServeMetrics()
        self._router = router
        self.resident: Resident | None = None
        self.decoder: BatchDecoder | None = None
        self.cont: ContinuousDecoder | None = None  # the continuous scheduler's decoder
        self.miss: serve_miss.SlotMiss | None = None  # dropped mass of the continuous rows
        self.mixed = False  # patterns share one resident union; rows masked per pattern
        self.mode_reason = "the batch scheduler"  # why mixed or swapped (/health)
        self.memory: memory.MemoryPlan | None = None  # set by load()
        self.resident_keep: KeepSets | None = None
        self.tokenizer: Any = None
        self.patterns: dict[str, KeepSets] = {}
        self.pattern_routers = PatternRouters()  # calibrated routers per pattern (served.py)
        self.pattern_info: dict[str, Any] = {}
        # a folder is served under its name, a hub id under itself
        local = Path(config.model).expanduser()
        self.model_name = config.served_model_name or (
            local.name if local.exists() and local.name else config.model
        )
        self.max_model_len = 0
        self.resident_task: str | None = None
        self.swap_epoch = 0
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0
        self.info: dict[str, Any] = {}
        self.scheduler: Scheduler[GenRequest] = Scheduler(
            config.max_batch, config.max_wait_ms / 1000.0
        )
        self._unrouted: deque[GenRequest] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fatal: BaseException | None = None
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._warmup_pending = False
        self._live: set[GenRequest] = set()  # submitted and not ended
        self.shutting_down = False
        self.warm = threading.Event()
        self._froze = 0  # objects this engine's warm-up moved out of the GC's reach
        self.ready = False

    # -- loading ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Resolve the model, read the store, build the patterns, load the resident model."""

        t0 = time.perf_counter()
        cfg = self.config
        src = resolve_model(cfg.model)
        self.source = src
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, src)
        self.tokenizer = load_tokenizer(src.path)
        max_pos = int(getattr(src.config, "max_position_embeddings", 0) or 0) or 4096
        auto_cache = "static" if device.type == "cuda" else "dynamic"
        cache: CacheMode = auto_cache if cfg.cache == "auto" else cfg.cache  # type: ignore[assignment]
        default_len = 2048 if cache == "static" else 8192
        self.max_model_len = min(max_pos, cfg.max_model_len or default_len)
        self.memory = plan = memory.make_plan(
            src.config,
            budget=cfg.budget,
            device=device,
            dtype=dtype,
            fraction=cfg.kv_memory_fraction,
            max_batch=cfg.max_batch,
            min_kv_slots=cfg.min_kv_slots,
            prefill_tokens=cfg.prefill_tokens,
            max_len=self.max_model_len,
        )
        if cfg.patterns is not None:
            self.patterns = dict(cfg.patterns)
            self.pattern_info = {"source": "given"}
            store = None
        else:
            assert cfg.store is not None
            store, self.patterns, self.pattern_info = build_patterns(
                cfg.store,
                src,
                keep=cfg.keep,
                budget=plan.weights_budget(),
                dtype=dtype,
                metric=cfg.metric,
                quantize=cfg.quantize,
                allocation=cfg.allocation,
            )
            self.patterns, self.pattern_routers = pattern_routers(
                store, self.patterns, src, enabled=cfg.calibrated_routers
            )
        if not self.patterns:
            raise UsageError("no patterns to serve: the store has no tasks")
        # ragged keep sets (--allocation nonuniform) are served mixed only: see below
        ragged = any(not k.is_uniform for k in self.patterns.values())
        counts = {k.count for k in self.patterns.values()}
        if not ragged and len(counts) != 1:
            raise UsageError(f"all patterns must keep the same expert count, got {counts}")
        for name, keep in self.patterns.items():
            try:
                keep.validate(src.arch, src.config, allow_ragged=ragged)
            except UsageError as err:
                raise UsageError(f"pattern {name!r}: {err}") from None
        default = cfg.default_task or (
            GLOBAL_PATTERN if GLOBAL_PATTERN in self.patterns else next(iter(self.patterns))
        )
        if default not in self.patterns:
            raise UsageError(f"default pattern {default!r} is not one of {sorted(self.patterns)}")
        self.default_task = default
        kwargs: dict[str, Any] = {}
        impl = cfg.experts_implementation
        if impl is None and device.type == "cuda":
            # decode through premoe's GEMV kernel (sync-free: CUDA graphs capture it), larger
            # batches through grouped_mm, which reads only the routed experts; compiled, it
            # needs bf16 (else transformers loops with a host sync): batched_mm is graph-safe
            # in every dtype
            if kernels.available(device):
                impl = gemv_experts.register()
            else:
                impl = "grouped_mm" if dtype == torch.bfloat16 else "batched_mm"
        if impl is not None:
            kwargs["experts_implementation"] = impl
        continuous = self._continuous_supported(src)
        self.mixed = continuous and self._mixed_fits(src, dtype)
        shapes = {
            tuple(len(v) for _, v in sorted(k.layers.items())) for k in self.patterns.values()
        }
        if ragged and not self.mixed and len(shapes) > 1:
            # a swap keeps every layer's slot count; ragged patterns differ there
            raise UsageError(
                "nonuniform allocation needs the patterns' union resident (mixed mode), but the "
                f"patterns would be swapped ({self.mode_reason}); give a larger --budget, or "
                "use --allocation uniform"
            )
        kept = _mean_kept(self.patterns[default])
        resident_keep = (
            rowmask.union_keep(self.patterns, src.num_experts)
            if self.mixed
            else self.patterns[default]
        )
        self.resident = open_resident(
            src,
            resident_keep,
            device=device,
            dtype=dtype,
            host_cache=cfg.host_cache,
            prefetch=None if self.mixed else self.patterns,
            quantize=cfg.quantize,
            routers=None if self.mixed else self.pattern_routers.tensors(default),
            **kwargs,
        )
        self.resident_keep = resident_keep
        self.resident_task = None if self.mixed else default
        model = self.resident.model
        model.eval()
        routing = None
        if self.mixed:
            own = {n: self.pattern_routers.tensors(n) for n in self.patterns}
            routing = rowmask.RowRouting(model, src.arch, resident_keep, self.patterns, own)
            why = routing.verify(model)
            if why is not None:  # pragma: no cover - no supported family does this
                raise UsageError(f"mixed patterns cannot be served for this model: {why}")
        compile_mode: CompileMode = (
            ("reduce-overhead" if device.type == "cuda" and cache == "static" else "none")
            if cfg.compile == "auto"
            else cfg.compile  # type: ignore[assignment]
        )
        if compile_mode != "none" and cache != "static":
            raise UsageError("--compile needs the static cache (--cache static)")
        if continuous:
            slots = self._kv_slots(device)
            self.cont = ContinuousDecoder(
                model,
                self.tokenizer,
                slots=slots,
                max_len=self.max_model_len,
                prefill_tokens=cfg.prefill_tokens,
                routing=routing,
                graphs=cfg.compile != "none",
                compile=cfg.compile in ("auto", "default"),
                pipeline=cfg.pipeline and device.type == "cuda" and cfg.compile != "none",
            )
            compile_mode = "none"
        else:
            self.decoder = BatchDecoder(
                model,
                self.tokenizer,
                max_batch=cfg.max_batch,
                max_len=self.max_model_len,
                cache=cache,
                compile=compile_mode,
                buckets=cfg.decode_buckets,
            )
        if self._router is None and store is not None:
            self._router = make_router(store, model, self.tokenizer, src, cfg.route_threshold)
        self.miss = attach_miss(self, model, src)  # dropped mass, reroute (reroute.py)
        self.load_seconds = time.perf_counter() - t0
        # warm-up (compilation, CUDA graph capture) runs in the worker thread, which is the
        # thread that replays the graphs (torch keeps CUDA graph trees per thread)
        graphs = self.cont is not None and self.cont.graphs is not None
        self._warmup_pending = (
            cfg.warmup if cfg.warmup is not None else (compile_mode != "none" or graphs)
        )
        self.metrics.resident_bytes.set(self.resident.resident_bytes)
        self.metrics.patterns_mixed.set(1.0 if self.mixed else 0.0)
        kv_bytes = self.cont.slots * plan.per_slot if self.cont is not None else 0
        self.metrics.kv_cache_bytes.set(kv_bytes)
        for name in self.patterns:
            on = self.mixed or name == default
            self.metrics.resident_pattern.set(1.0 if on else 0.0, task=name)
        self.info = {
            "premoe_version": premoe.__version__,
            "model": str(src.path),
            "served_model_name": self.model_name,
            "architecture": src.arch.name,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "experts_kept": kept,  # nonuniform: the mean over layers (of the default pattern)
            "allocation": "nonuniform" if ragged or cfg.allocation == "nonuniform" else "uniform",
            "experts_total": src.num_experts,
            "patterns": sorted(self.patterns),
            "default_pattern": default,
            "router": "store" if self._router is not None else "none (default pattern)",
            "max_batch": cfg.max_batch,
            "scheduler": "continuous" if continuous else "batch",
            "patterns_mode": "mixed" if self.mixed else "swap",
            "routers": self.pattern_routers.to_json(self.patterns),
            "patterns_mode_reason": self.mode_reason,
            "resident_experts_per_layer": resident_keep.count,
            "fused_routers": self.cont is not None and self.cont.fused_routers is not None,
            "miss_policy": cfg.miss_policy,
            "dropped_mass_metered": self.miss is not None,
            **(
                {"kv_slots": self.cont.slots, "kv_bytes": kv_bytes} if self.cont is not None else {}
            ),
            "memory": {
                "allowed_bytes": plan.allowed.nbytes,
                "allowed_by": plan.allowed.source,
                "kv_bytes_per_slot": plan.per_slot,
                "activation_headroom_bytes": plan.headroom,
                "min_kv_slots": plan.min_slots,
            },
            "max_wait_ms": cfg.max_wait_ms,
            "max_model_len": self.max_model_len,
            "cache": cache,
            "compile": ("inductor+cuda-graphs" if self.cont.graphs.compiled else "cuda-graphs")
            if graphs and self.cont is not None and self.cont.graphs is not None
            else compile_mode,
            "experts_implementation": getattr(model.config, "_experts_implementation", None),
            "resident_bytes": self.resident.resident_bytes,
            "load_seconds": round(self.load_seconds, 3),
            "warmup_seconds": round(self.warmup_seconds, 3),
            **({"store": self.pattern_info} if self.pattern_info else {}),
        }
        self.ready = True
        log.info(
            "serving %s: %d patterns, %s of %d experts resident per layer, %s on %s",
            self.model_name,
            len(self.patterns),
            kept,
            src.num_experts,
            self.info["dtype"],
            device,
        )

    def _continuous_supported(self, src: Any) -> bool:
        cfg = self.config
        if cfg.scheduler == "batch":
            return False
        why = kvcache.supports(src.config)
        if why is None and (cfg.cache == "static" or cfg.compile == "reduce-overhead"):
            why = "--cache static / --compile reduce-overhead belong to the batch scheduler"
        if why is not None:
            if cfg.scheduler == "continuous":
                raise UsageError(f"--scheduler continuous is not available: {why}")
            log.info("continuous batching is not available (%s); using the batch scheduler", why)
            return False
        return True

    def _mixed_fits(self, src: Any, dtype: torch.dtype) -> bool:
        """Whether the patterns are served from one resident union (see rowmask.py): only when
        the union + activation headroom + --min-kv-slots KV slots fit the memory allowed
        (memory.py: --budget, else what the device offers)."""
        cfg = self.config
        self.mode_reason = "--mixed off"
        if cfg.mixed == "off":
            return False
        if len({k.to_json().__repr__() for k in self.patterns.values()}) < 2:
            self.mode_reason = "one pattern"
            return False
        why = rowmask.unsupported(src.arch, src.config)
        if why is None and self.pattern_routers.routers:
            why = rowmask.unsupported_routers(src.arch)
        if why is None:
            union = rowmask.union_keep(self.patterns, src.num_experts).count
            weights = memory.weights_bytes(src, dtype, union, cfg.quantize)
            assert self.memory is not None
            mixed, why = self.memory.choose_mode(weights, forced=cfg.mixed == "on")
            self.mode_reason = why
            if mixed:
                log.info("patterns are mixed: %s", why)
                return True
        elif cfg.mixed == "on":
            raise UsageError(f"--mixed on is not possible: {why}")
        self.mode_reason = why
        log.info("patterns are swapped, not mixed: %s", why)
        return False

    def _kv_slots(self, device: torch.device) -> int:
        """Rows the KV cache holds: --max-batch, fewer when the memory allowed (memory.py) minus
        the resident weights and the activation headroom cannot hold that many."""
        assert self.resident is not None and self.memory is not None
        plan, max_batch = self.memory, self.config.max_batch
        slots = memory.kv_slots(
            allowed=plan.allowed.nbytes,
            resident=self.resident.resident_bytes,
            headroom=plan.headroom,
            per_slot=plan.per_slot,
            max_batch=max_batch,
        )
        if device.type == "cuda":  # and whatever the device has left now, weights loaded
            free, _ = torch.cuda.mem_get_info(device)
            fit = memory.kv_slots(
                allowed=int(free * self.config.kv_memory_fraction),
                resident=0,
                headroom=plan.headroom,
                per_slot=plan.per_slot,
                max_batch=max_batch,
            )
            slots = min(slots, fit)
        log.info(
            "KV cache: %d slots x %d tokens, %.1f MiB",
            slots,
            self.max_model_len,
            slots * plan.per_slot / 2**20,
        )
        return slots

    # -- worker ----------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.ready:
            self.load()
        self._stop.clear()
        self.metrics.gc_pauses.install()
        self._thread = threading.Thread(target=self._run, name="premoe-decode", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while self._calls:
            self._calls.popleft()[1].cancel()
        pending = list(self._unrouted)
        self._unrouted.clear()
        while (batch := self.scheduler.next_batch(None)) is not None:
            pending.extend(batch.items)
        for req in pending:
            req.fail(RequestError("the server is shutting down", 503, "server_error"))
        self.abort_all("the server is shutting down")  # rows the worker left running
        self.metrics.gc_pauses.remove()
        if self._froze:  # this engine's objects may be collected again once it is dropped
            gc.unfreeze()
            self._froze = 0

    # -- shutdown --------------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """Admit no more requests (503); the ones in flight continue."""
        self.shutting_down = True

    def in_flight(self) -> int:
        with self._lock:
            return len(self._live)

    def abort_all(self, message: str) -> int:
        """End every request in flight with a 503 error event; returns how many."""
        with self._lock:
            live = list(self._live)
        n = 0
        for req in live:
            if not req.cancelled:
                req.fail(RequestError(message, 503, "server_error", code="shutting_down"))
                n += 1
        self._wake.set()
        return n

    def _forget(self, req: GenRequest) -> None:
        with self._lock:
            self._live.discard(req)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._fatal is None

    def _queue_depth(self) -> int:
        return len(self._unrouted) + self.scheduler.depth()

    def _update_queue_metric(self) -> None:
        self.metrics.queue_depth.set(self._queue_depth())

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run `fn()` in the worker thread between batches and return its result (benchmarks,
        maintenance: anything that must not race a batch or must use the worker's graphs)."""
        fut: Future[Any] = Future()
        self._calls.append((fn, fut))
        self._wake.set()
        return fut.result(timeout)

    def _run_calls(self) -> None:
        while self._calls:
            fn, fut = self._calls.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:
                    fut.set_exception(exc)

    def _warmup(self) -> None:
        if self.cont is not None and self._warmup_pending:
            self._warmup_pending = False
            t0 = time.perf_counter()
            ids = self.encode_prompt("warm up")[:8] or [self.cont.pad_id]
            graphs = self.cont.graphs
            if graphs is not None and graphs.compiled:
                try:
                    graphs.warmup()
                except Exception as exc:
                    log.exception("compiling the decode step failed; CUDA graphs of eager steps")
                    graphs.disable_compile()
                    self.info["compile"] = f"cuda-graphs (compile failed: {type(exc).__name__})"
            if graphs is not None and not graphs.compiled:
                try:
                    graphs.warmup()
                except Exception as exc:
                    log.exception("CUDA graph capture failed; decoding continues eagerly")
                    self.cont.graphs = None
                    self.info["compile"] = f"none (capture failed: {type(exc).__name__})"
            # prefill shapes too (the compiled layers run prefill chunks)
            self.cont.warm_prefill(ids, self.default_task)
            self.warmup_seconds = time.perf_counter() - t0
            self.info["warmup_seconds"] = round(self.warmup_seconds, 3)
        if self.decoder is not None and self._warmup_pending:
            self._warmup_pending = False
            try:
                self.warmup_seconds = self.decoder.warmup()
            except Exception as exc:
                log.exception("warm-up failed; decoding continues without the compiled step")
                self.decoder.disable_compile()
                self.info["compile"] = f"none (compilation failed: {type(exc).__name__})"
            self.info["warmup_seconds"] = round(self.warmup_seconds, 3)
            log.info("warm-up took %.1f s", self.warmup_seconds)
        if self.config.freeze_gc:
            self._froze = freeze_heap()
        self.warm.set()

    def _run(self) -> None:
        try:
            with torch.no_grad():
                self._warmup()
                while not self._stop.is_set():
                    self._wake.clear()
                    self._run_calls()
                    self._route_pending()
                    if self.cont is not None:
                        if not self._continuous_step():
                            self._wake.wait(0.25)
                        continue
                    batch = self.scheduler.next_batch(self.resident_task)
                    self._update_queue_metric()
                    if batch is None:
                        self._wake.wait(0.25)
                        continue
                    self._run_batch(batch.task, batch.items)
        except BaseException as exc:  # pragma: no cover - a bug in the worker itself
            self._fatal = exc
            log.exception("decode worker died")
            raise

    # -- continuous batching ---------------------------------------------------------------------
    def _admit(self) -> None:
        """Move waiting requests into free KV slots. Mixed: oldest first, any pattern. Swapping:
        the resident pattern's requests; when the scheduler picks another pattern (its oldest
        request waited past --max-wait-ms, or the resident one has none waiting), admit nothing
        until the running rows finish, then swap."""
        cont = self.cont
        assert cont is not None
        free = cont.free()
        while free > 0:
            if self.mixed:
                req = self.scheduler.pop_oldest()
            else:
                choice = self.scheduler.choose(self.resident_task)
                if choice is None:
                    return
                task = choice[0]
                if task != self.resident_task:
                    if cont.active():
                        return  # drain, then swap
                    cont.settle()  # the last step may still run on the experts swapped out
                    try:
                        self._swap(task)
                    except Exception as exc:
                        log.exception("swap to %s failed", task)
                        for r in self.scheduler.pop(task, self.config.max_queue):
                            r.fail(
                                RequestError(f"swapping experts failed: {exc}", 500, "server_error")
                            )
                        return
                    self.resident_keep = self.patterns[task]
                req = next(iter(self.scheduler.pop(task, 1)), None)
            if req is None:
                return
            if req.cancelled:
                continue
            if req.resume is not None:  # rerouted: goes on under its new pattern
                cont.resume(req.resume, req.task)
                req.resume = None
                req.served_keep = self.patterns[req.task]
                free -= 1
                continue
            try:
                cont.add(req, req.prompt_ids, req.params, req.task)
            except ValueError as exc:
                req.fail(RequestError(str(exc), 400))
                continue
            req.served_keep = self.patterns[req.task]
            req.on_start()
            self.metrics.prompt_tokens.inc(len(req.prompt_ids), task=req.task)
            free -= 1

    def _continuous_step(self) -> bool:
        """Admit, then one step; False when there was nothing to do."""
        cont = self.cont
        assert cont is not None and self.resident_keep is not None
        self._admit()
        self._update_queue_metric()
        m = self.metrics
        if not cont.active():
            m.running.set(0)
            return False
        keep, epoch = self.resident_keep, self.swap_epoch

        def check() -> None:
            self._check_resident(keep, epoch)

        try:
            report = cont.step(between=check)
        except Exception as exc:
            taken, cont.taken_out = cont.taken_out, []  # rerouted rows fail with the step
            for seq in taken:
                if isinstance(seq.sink, GenRequest):
                    seq.sink.fail(RequestError(f"generation failed: {exc}", 500, "server_error"))
            ids = [getattr(s.sink, "id", "-") for s in cont.active()]
            log.exception("a step of %d rows failed (requests %s)", len(ids), ", ".join(ids))
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            for seq in cont.clear():
                sink = seq.sink
                if isinstance(sink, GenRequest):
                    sink.fail(RequestError(f"generation failed: {exc}", 500, "server_error"))
            return True
        taken, cont.taken_out = cont.taken_out, []
        for seq in taken:  # back to the queue under its new pattern (miss.py)
            if isinstance(seq.sink, GenRequest) and not seq.sink.cancelled:
                seq.sink.resume = seq
                self.scheduler.put(seq.sink)
        self._observe_step(report)
        return True

    def _observe_step(self, report: StepReport) -> None:
        m = self.metrics
        assert self.cont is not None
        m.running.set(len(self.cont.active()))
        m.busy_seconds.inc(report.seconds)
        if report.decode_rows:
            mode = "mixed" if len(report.patterns) > 1 else "single"
            m.steps.inc(mode=mode)
            m.step_patterns.set(len(report.patterns))
            m.batch_size.observe(report.decode_rows)
            m.step_seconds.observe(report.seconds)
        if report.prefill_tokens:
            m.prefill_steps.inc()
            m.prefill_step_tokens.observe(report.prefill_tokens)
            m.prefill_seconds.observe(report.prefill_seconds)

    def _route_pending(self) -> None:
        while self._unrouted:
            req = self._unrouted.popleft()
            if req.cancelled:
                continue
            try:
                route = self._route(req.prompt_text)
            except Exception as exc:
                log.exception("routing failed")
                req.fail(RequestError(f"routing failed: {exc}", 500, "server_error"))
                continue
            req.set_route(route)
            self.scheduler.put(req)

    def _route(self, prompt: str) -> RouteInfo:
        if self._router is None:
            return RouteInfo(self.default_task, None, True, True)
        try:
            route = self._router(prompt)
        except PremoeError as err:  # e.g. a blank prompt: nothing to route on
            log.debug("routing fell back to %s: %s", self.default_task, err)
            return RouteInfo(self.default_task, None, True, True)
        if route.task not in self.patterns:
            log.warning("router chose unknown pattern %r; using %r", route.task, self.default_task)
            return RouteInfo(self.default_task, route.similarity, True, True)
        return route

    def _check_resident(self, keep: KeepSets, epoch: int) -> None:
        assert self.resident is not None
        now = self.resident.keep
        if self.swap_epoch != epoch or (now is not keep and now != keep):
            raise AssertionError(
                "invariant broken: the resident expert set changed under a running batch"
            )

    def _swap(self, task: str) -> None:
        assert self.resident is not None
        keep = self.patterns[task]
        routers = self.pattern_routers.tensors(task)  # None: the source's router rows
        if self.resident.keep == keep and self.resident.routers is routers:
            self.resident_task = task
            return
        stats = self.resident.swap_to(keep, routers=routers)
        self.swap_epoch += 1
        m = self.metrics
        m.swaps.inc()
        m.swap_experts.inc(float(stats.experts_moved))
        m.swap_bytes.inc(float(stats.bytes))
        m.swap_seconds.inc(stats.seconds)
        if self.resident_task is not None:
            m.resident_pattern.set(0.0, task=self.resident_task)
        m.resident_pattern.set(1.0, task=task)
        log.info(
            "swapped %s -> %s: %s experts, %.1f MB, %.3f s",
            self.resident_task,
            task,
            stats.experts_moved,
            stats.bytes / 1e6,
            stats.seconds,
        )
        self.resident_task = task

    def _groups(self, reqs: Sequence[GenRequest]) -> list[list[GenRequest]]:
        """Split a batch so that every part fits the KV length: all rows of a part share
        one padded prompt length, and each must still have room for its max_tokens."""
        assert self.decoder is not None
        groups: list[list[GenRequest]] = []
        for req in sorted(reqs, key=lambda r: len(r.prompt_ids)):
            if groups:
                g = groups[-1]
                plen = len(req.prompt_ids)  # sorted: the longest so far
                if all(plen + r.params.max_tokens <= self.max_model_len for r in (*g, req)):
                    g.append(req)
                    continue
            groups.append([req])
        return groups

    def _run_batch(self, task: str, reqs: list[GenRequest]) -> None:
        assert self.decoder is not None and self.resident is not None
        reqs = [r for r in reqs if not r.cancelled]
        if not reqs:
            return
        keep = self.patterns[task]
        try:
            self._swap(task)
        except Exception as exc:
            log.exception("swap to %s failed", task)
            for r in reqs:
                r.fail(RequestError(f"swapping experts failed: {exc}", 500, "server_error"))
            return
        epoch = self.swap_epoch
        self._check_resident(keep, epoch)
        m = self.metrics
        m.batches.inc(task=task)
        m.batch_size.observe(len(reqs))
        m.running.set(len(reqs))
        for r in reqs:
            assert r.task == task, "a request was batched with another pattern"
            r.served_keep = keep
            r.on_start()
            m.prompt_tokens.inc(len(r.prompt_ids), task=task)
        try:
            for group in self._groups(reqs):
                live = [r for r in group if not r.cancelled]
                if not live:
                    continue
                rows = [DecodeRow(r.prompt_ids, r.params, r) for r in live]
                last: list[float] = []  # when the previous step ended (none: prefill)

                def check(keep: KeepSets = keep, epoch: int = epoch, last: list = last) -> None:
                    self._check_resident(keep, epoch)
                    now = time.perf_counter()
                    if last:  # one decode step since the last call (the first call: prefill)
                        m.step_seconds.observe(now - last[0])
                    last[:] = [now]

                self.decoder.generate(rows, between_steps=check)
                self._check_resident(keep, epoch)
        except Exception as exc:
            log.exception("batch of %d requests (%s) failed", len(reqs), task)
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            for r in reqs:
                if r.finish_reason is None and not r.cancelled:
                    r.fail(RequestError(f"generation failed: {exc}", 500, "server_error"))
        finally:
            m.running.set(0)

    # -- requests --------------------------------------------------------------------------------
    def _cancelled(self, req: GenRequest) -> None:
        if req.route is not None:
            self.scheduler.remove(req)
        self._update_queue_metric()

    def token_text(self, token: int) -> str:
        """One token as text (as vLLM reports it in logprobs)."""
        return str(self.tokenizer.decode([token]))

    def encode_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return [int(i) for i in ids]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(
                f"model {self.model_name!r} has no chat template; use /v1/completions",
                400,
                param="messages",
                code="no_chat_template",
            )
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:
            raise RequestError(
                f"the chat template rejected these messages: {exc}", 400, param="messages"
            ) from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [int(i) for i in ids]

    def resolve_max_tokens(
        self, prompt_len: int, requested: int | None, default: int | None
    ) -> int:
        """max_tokens for a request, or a 400 when the prompt and it do not fit the window."""
        if prompt_len == 0:
            raise RequestError("the prompt is empty", 400, param="prompt")
        room = self.max_model_len - prompt_len
        if room < 1:
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the "
                f"prompt has {prompt_len} tokens",
                400,
                param="messages" if default is None else "prompt",
                code="context_length_exceeded",
            )
        if requested is None:
            return room if default is None else min(default, room)
        if prompt_len + requested > self.max_model_len:
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; you "
                f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                f"{requested} for the completion); lower max_tokens to at most {room}",
                400,
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    def submit(
        self,
        prompt_ids: list[int],
        prompt_text: str,
        params: SamplingParams,
        task: str | None = None,
    ) -> GenRequest:
        """Queue a request (call from the event loop). Raises RequestError when refused."""
        if self.shutting_down:
            raise RequestError(
                "the server is shutting down", 503, "server_error", code="shutting_down"
            )
        if not self.alive:
            raise RequestError("the decode worker is not running", 503, "server_error")
        if task is not None and task not in self.patterns:
            raise RequestError(
                f"unknown pattern {task!r}; this server has {sorted(self.patterns)}",
                400,
                param="premoe.task",
                code="unknown_pattern",
            )
        if self.cont is None and not params.basic:
            raise RequestError(
                "top_k, min_p, penalties, logprobs and stop_token_ids need the continuous "
                "scheduler (--scheduler continuous)",
                400,
                code="unsupported_with_batch_scheduler",
            )
        if self._queue_depth() >= self.config.max_queue:
            raise RequestError(
                f"the server is busy ({self.config.max_queue} requests waiting); retry later",
                429,
                "rate_limit_error",
                code="queue_full",
            )
        req = GenRequest(self, prompt_ids, prompt_text, params, task, asyncio.get_running_loop())
        with self._lock:
            self._live.add(req)
        if task is not None:
            req.set_route(RouteInfo(task, None, False, False))
            self.scheduler.put(req)
        else:
            self._unrouted.append(req)
        self._update_queue_metric()
        self._wake.set()
        return req

    def health(self, detail: bool = True) -> dict[str, Any]:
        """Liveness and what is resident. `detail=False` (a caller without the API key) leaves
        out the model and store paths."""
        status = (
            "error"
            if not self.alive
            else "shutting_down"
            if self.shutting_down
            else "ok"
            if self.warm.is_set()
            else "warming_up"
        )
        info = self.info if detail else {k: v for k, v in self.info.items() if k not in _PRIVATE}
        return {
            "status": status,
            "resident_pattern": self.resident_task,
            "queue_depth": self._queue_depth(),
            "swaps": int(self.metrics.swaps.value()),
            **info,
        }


_PRIVATE = ("model", "store")  # health fields that hold local paths


def freeze_heap() -> int:
    """Collect, then move every object alive (the model, its compiled graphs, the tokenizer) to
    the cyclic GC's permanent generation, as vLLM and SGLang do after start-up; returns how many.
    A full collection walks every tracked object: with start-up's hundreds of thousands that is
    a pause of the decode loop and of every stream (0.2 s for the CPU demo model) whenever
    serving's garbage triggers one. Reference counting still frees them; only cycles among
    them wait for `gc.unfreeze()`."""
    gc.collect()
    gc.freeze()
    n = gc.get_freeze_count()
    log.info("moved %d start-up objects out of the garbage collector's full passes", n)
    return n
