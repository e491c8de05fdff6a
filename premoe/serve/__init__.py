"""`premoe serve`: an OpenAI-compatible server that routes each request to a task pattern,
batches requests continuously, and serves rows of several patterns in one batch when their
experts fit together (else swaps the resident experts on demand).

    from premoe.serve import Engine, EngineConfig, ServerOptions, create_app, run_server
    engine = Engine(EngineConfig("path/to/model", store="store", keep=32))
    engine.load()
    run_server(create_app(engine.config, engine=engine), engine, ServerOptions(port=8000))

Modules: app (HTTP API), schemas (request/response models), engine (the worker thread and its
scheduling), continuous (iteration-level decoder), kvcache (per-slot KV cache), rowmask (per-row
router masks over a resident union), sampling (next-token choice), decode (the batch decoder and
text streaming), scheduler (per-pattern queues), resident (expert swaps), patterns (store ->
keep sets, router), metrics (Prometheus), guard (connection timeouts and caps), server (uvicorn
with a graceful shutdown).
"""

from __future__ import annotations

from premoe.serve.app import create_app
from premoe.serve.continuous import ContinuousDecoder, StepReport
from premoe.serve.decode import BatchDecoder, DecodeStats, SamplingParams
from premoe.serve.engine import GLOBAL_PATTERN, Engine, EngineConfig, RequestError, RouteInfo
from premoe.serve.kvcache import SlotKVCache
from premoe.serve.metrics import ServeMetrics
from premoe.serve.rowmask import RowRouting
from premoe.serve.scheduler import Scheduler
from premoe.serve.server import ServerOptions, run_server

__all__ = [
    "GLOBAL_PATTERN",
    "BatchDecoder",
    "ContinuousDecoder",
    "DecodeStats",
    "Engine",
    "EngineConfig",
    "RequestError",
    "RouteInfo",
    "RowRouting",
    "SamplingParams",
    "Scheduler",
    "ServeMetrics",
    "ServerOptions",
    "SlotKVCache",
    "StepReport",
    "create_app",
    "run_server",
]
