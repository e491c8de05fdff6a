"""`premoe serve MODEL --store STORE --budget 24GiB`: the OpenAI-compatible server."""

from __future__ import annotations

import errno
import logging
import socket
from typing import Annotated

import typer

from premoe.errors import UsageError
from premoe.load.decode import DEFAULT_REROUTE_THRESHOLD, DEFAULT_WINDOW
from premoe.serve.guard import KEEP_ALIVE_S
from premoe_cli.options import (
    BlockOpt,
    CalibratedRoutersOpt,
    DeviceOpt,
    DtypeOpt,
    GroupSizeOpt,
    ModelArg,
    ResidentQuantizeOpt,
    StoreOpt,
    expert_quantization,
)

log = logging.getLogger(__name__)


def _check_port(host: str, port: int) -> None:
    """Fail before loading the model when the address cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve --host {host!r}: {exc}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc})"
            raise UsageError(f"{host}:{port} {why}; choose another --port") from None


def serve_command(
    model: ModelArg,
    store: StoreOpt,
    budget: Annotated[
        str | None,
        typer.Option(
            help="Device memory the server may use, e.g. 24GiB: resident weights, KV cache and "
            "activations. Keeps the largest number of experts per layer that fits beside "
            "--min-kv-slots KV slots; the KV cache gets what the weights leave. Give this or "
            "--keep (then the free device memory is the limit)."
        ),
    ] = None,
    keep: Annotated[
        int | None, typer.Option(help="Experts kept (resident) per MoE layer. Or --budget.")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to bind. Only this machine can connect by default.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="PREMOE_API_KEY",
            help="Require 'Authorization: Bearer KEY' on every endpoint but /health "
            "(or set PREMOE_API_KEY).",
        ),
    ] = None,
    max_batch: Annotated[
        int,
        typer.Option(
            min=1,
            max=1024,
            help="Requests decoded together (continuous: KV cache slots, fewer if the device "
            "memory left after the weights cannot hold them).",
        ),
    ] = 8,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            min=0,
            help="A pattern whose oldest request has waited this long gets the next turn, "
            "even if that costs a swap.",
        ),
    ] = 200.0,
    max_model_len: Annotated[
        int | None,
        typer.Option(help="Context window (prompt + completion tokens); default from the model."),
    ] = None,
    max_queue: Annotated[
        int, typer.Option(min=1, help="Requests waiting at most; beyond it: 429.")
    ] = 256,
    metric: Annotated[
        str | None, typer.Option(help="Store metric that ranks experts (default: tcess).")
    ] = None,
    allocation: Annotated[
        str,
        typer.Option(
            help="uniform: --keep/--budget's K experts in every MoE layer; nonuniform: the same "
            "total (K x layers) spread by each pattern's scores, more experts where a layer's "
            "scores are spread, fewer where concentrated. Nonuniform needs the patterns' union "
            "resident (mixed mode).",
        ),
    ] = "uniform",
    route_threshold: Annotated[
        float | None,
        typer.Option(help="Similarity below which a request gets the __global__ pattern."),
    ] = None,
    cache: Annotated[
        str, typer.Option(help="KV cache: auto (static on CUDA), dynamic or static.")
    ] = "auto",
    compile: Annotated[
        str,
        typer.Option(
            help="The decode step on CUDA: auto or default (torch.compile'd, then one CUDA graph "
            "replay per step), none (eager kernel launches); reduce-overhead: the batch "
            "scheduler's torch.compile mode."
        ),
    ] = "auto",
    host_cache: Annotated[
        str | None,
        typer.Option(
            help="Host memory for an expert cache, e.g. 32GiB: every pattern's experts are read "
            "into it at start-up, so a swap is only host-to-device copies."
        ),
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="Model id clients use (default: the folder name).")
    ] = None,
    max_body: Annotated[
        int, typer.Option("--max-body-bytes", help="Largest request body accepted.")
    ] = 1 << 20,
    scheduler: Annotated[
        str,
        typer.Option(
            help="auto (continuous where the model allows), continuous (requests join and "
            "leave the running batch between decode steps) or batch (one batch per pattern)."
        ),
    ] = "auto",
    mixed: Annotated[
        str,
        typer.Option(
            help="Rows of different patterns in one batch, the union of their experts resident: "
            "auto (when the union and --min-kv-slots KV slots fit --budget, or without --budget "
            "the free device memory), on, off (swap expert sets between patterns)."
        ),
    ] = "auto",
    min_kv_slots: Annotated[
        int,
        typer.Option(
            min=1,
            help="KV cache slots that must fit beside the resident weights: what --budget "
            "keeps aside, and what mixed mode needs beside the union of the patterns.",
        ),
    ] = 4,
    prefill_tokens: Annotated[
        int,
        typer.Option(
            min=1,
            help="Prompt positions prefilled per step at most, padding of shorter chunks "
            "included: bounds how long running streams stall for newcomers, and the "
            "activation memory kept aside for that forward.",
        ),
    ] = 512,
    pipeline: Annotated[
        bool,
        typer.Option(
            help="On CUDA: launch each decode step before the host has read the last one's "
            "tokens (streaming, stop checks overlap the device's work; greedy rows). "
            "--no-pipeline reads every step before the next.",
        ),
    ] = True,
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            min=0,
            help="On SIGTERM/SIGINT: seconds in-flight requests get to finish; then each is "
            "ended with an error event (streams) or a 503, and the server exits 0.",
        ),
    ] = 30.0,
    header_timeout: Annotated[
        float,
        typer.Option(min=0.1, help="Seconds a connection gets to send its request headers."),
    ] = 5.0,
    body_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a request gets to send its body.")
    ] = 30.0,
    keep_alive_timeout: Annotated[
        float,
        typer.Option(
            min=1,
            help="Seconds an idle kept-alive connection stays open. Keep it longer than your "
            "clients' pool idle expiry (httpx/OpenAI SDK 5 s, aiohttp 15 s, Go 90 s), or a "
            "request sent as the server closes the connection is lost to a reset.",
        ),
    ] = KEEP_ALIVE_S,
    max_pending_per_client: Annotated[
        int,
        typer.Option(
            min=1,
            help="Connections one client address may hold without having sent a whole "
            "request; one more closes its oldest.",
        ),
    ] = 1024,
    calibrated_routers: CalibratedRoutersOpt = None,
    meter: Annotated[
        bool,
        typer.Option(
            "--meter/--no-meter",
            help="Measure each request's dropped mass (share of the full router's top-k weight "
            "on experts its pattern lacks): 'dropped_mass' in the response's premoe object and "
            "the premoe_dropped_mass histogram. Continuous scheduler only.",
        ),
    ] = True,
    gc_freeze: Annotated[
        bool,
        typer.Option(
            "--gc-freeze/--no-gc-freeze",
            help="After warm-up, move what start-up allocated out of Python's garbage "
            "collector's full passes (gc.freeze, as vLLM does): such a pass walks every object "
            "and pauses all decoding and streaming while it runs.",
        ),
    ] = True,
    miss_policy: Annotated[
        str,
        typer.Option(
            help="mask: each request keeps its pattern; reroute: a request whose windowed "
            "dropped mass exceeds --miss-threshold is switched to the pattern retrieval picks "
            "for its text so far (fetch: `premoe generate` only).",
        ),
    ] = "mask",
    miss_window: Annotated[
        int, typer.Option(help="Tokens per dropped-mass check (reroute).")
    ] = DEFAULT_WINDOW,
    miss_threshold: Annotated[
        float, typer.Option(help="Mean dropped mass over a window that triggers a reroute.")
    ] = DEFAULT_REROUTE_THRESHOLD,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: ResidentQuantizeOpt = None,
    block: BlockOpt = 128,
    group_size: GroupSizeOpt = 128,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API, routing each request to a stored task
    pattern and keeping only that pattern's experts resident (swapped in place on demand).

    Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true),
    GET /v1/models, GET /health, GET /metrics (Prometheus). A request can name its pattern with
    "premoe": {"task": "math"} in the body; the pattern that served it is in the response's
    "premoe" field and the X-Premoe-Task header.

    Example: premoe serve ./Qwen3-30B-A3B --store patterns/qwen3 --budget 24GiB --port 8000
    """
    from premoe.serve import Engine, EngineConfig, create_app
    from premoe.serve.guard import GuardSettings
    from premoe.serve.server import ServerOptions, run_server

    config = EngineConfig(
        model=model,
        store=store,
        keep=keep,
        budget=budget,
        metric=metric,
        allocation=allocation,
        device=device,
        dtype=dtype,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_model_len=max_model_len,
        max_queue=max_queue,
        cache=cache,
        compile=compile,
        served_model_name=served_model_name,
        api_key=api_key,
        max_body_bytes=max_body,
        route_threshold=route_threshold,
        host_cache=host_cache,
        scheduler=scheduler,
        mixed=mixed,
        min_kv_slots=min_kv_slots,
        prefill_tokens=prefill_tokens,
        pipeline=pipeline,
        quantize=expert_quantization(quantize, block, group_size),
        calibrated_routers=calibrated_routers,
        meter=meter,
        freeze_gc=gc_freeze,
        miss_policy=miss_policy,
        miss_window=miss_window,
        miss_threshold=miss_threshold,
    )
    config.check()
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning(
            "serving on %s without --api-key: anyone who can reach this address can use the model",
            host,
        )
    _check_port(host, port)
    engine = Engine(config)
    engine.load()  # bad model/store/budget: a one-line error before the socket opens
    app = create_app(config, engine=engine)
    typer.echo(
        f"premoe: serving {engine.model_name} ({len(engine.patterns)} patterns, "
        f"{engine.info['experts_kept']}/{engine.info['experts_total']} experts per layer"
        f"{' on average' if engine.info['allocation'] == 'nonuniform' else ''}) "
        f"on http://{host}:{port}/v1",
        err=True,
    )
    guard = GuardSettings(
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_pending_per_client=max_pending_per_client,
    )
    opts = ServerOptions(
        host=host,
        port=port,
        shutdown_timeout=shutdown_timeout,
        keep_alive_timeout=keep_alive_timeout,
        guard=guard,
    )
    run_server(app, engine, opts)
