"""`premoe serve`: an OpenAI-compatible server that routes each request to a task pattern and
swaps the resident experts on demand.

    from premoe.serve import EngineConfig, create_app
    app = create_app(EngineConfig("path/to/model", store="store", keep=32))
    # uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

from premoe.serve.app import create_app
from premoe.serve.decode import BatchDecoder, DecodeStats, SamplingParams
from premoe.serve.engine import GLOBAL_PATTERN, Engine, EngineConfig, RequestError, RouteInfo
from premoe.serve.metrics import ServeMetrics
from premoe.serve.scheduler import Scheduler

__all__ = [
    "GLOBAL_PATTERN",
    "BatchDecoder",
    "DecodeStats",
    "Engine",
    "EngineConfig",
    "RequestError",
    "RouteInfo",
    "SamplingParams",
    "Scheduler",
    "ServeMetrics",
    "create_app",
]
