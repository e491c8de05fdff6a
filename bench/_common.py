"""What the benchmark scripts share: the Qwen3-MoE-shaped model, device timing, tables and JSON.

The scripts import it as ``import _common`` (Python puts a script's own folder, bench/, first on
``sys.path``); importing it also puts the repository root on ``sys.path``, so the scripts run from
a checkout where premoe is not installed.

- `add_model_args(parser, ...)`: the model-shape options (``--layers --hidden --moe-intermediate
  --experts --top-k --heads --kv-heads --head-dim --vocab``), one argument group, defaults
  `MODEL_SHAPE` (about 15.6 B parameters, 31 GB in bf16) unless a script overrides them;
  `SMOKE_SHAPE` is the tiny CPU model of the ``--smoke`` modes.
- `qwen3_config(args, **overrides)`: the `Qwen3MoeConfig` of those options.
- `build_on_device(config, device, dtype)`: random weights allocated on the device, never the host.
- `write_layered_checkpoint(config, folder, device)`: random weights made on the device one layer
  at a time, one safetensors shard per layer, in the hub's per-expert layout.
- `sync`, `reset_peak`, `peak_bytes`, `DeviceTimer`, `median_seconds`, `graph_seconds` (one
  replay of calls captured in a CUDA graph): timing and peak device
  memory with the device synchronised (CUDA; no-ops elsewhere).
- `format_table` / `print_table`, `environment`, `write_json`, `free_port`, `max_rel_diff`.
- `stream_completion`: one streamed request to an OpenAI-compatible server, timed (latency, time
  to the first content chunk); `percentile`, `latency_summary`: their p50/p99 (None, never NaN,
  when nothing was measured); `start_demo_server`: `premoe serve` of the demo model.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# the default benchmark model: Qwen3-MoE-shaped, about 15.6 B parameters (31 GB in bf16)
MODEL_SHAPE: dict[str, Any] = {
    "layers": 24,
    "hidden": 2048,
    "moe_intermediate": 768,
    "experts": 128,
    "top_k": 8,
    "heads": 32,
    "kv_heads": None,  # None: heads / kv_ratio
    "head_dim": 128,
    "vocab": 151936,
}

# the tiny model of most --smoke modes (CPU, seconds)
SMOKE_SHAPE: dict[str, Any] = {
    "layers": 4,
    "hidden": 64,
    "moe_intermediate": 32,
    "experts": 8,
    "top_k": 2,
    "heads": 4,
    "head_dim": 16,
    "vocab": 1000,
}

SHAPE_KEYS = tuple(MODEL_SHAPE)


# ---- the model -----------------------------------------------------------------------------------


def add_model_args(
    parser: argparse.ArgumentParser, *, kv_ratio: int = 8, **defaults: Any
) -> argparse._ArgumentGroup:
    """Add the model-shape options to `parser` (defaults: `MODEL_SHAPE`, then `defaults`).

    ``--kv-heads`` left unset means ``max(1, heads // kv_ratio)`` (kept per script: the
    make_checkpoint-based scripts have always used heads / 4, the others heads / 8)."""
    unknown = set(defaults) - set(MODEL_SHAPE)
    if unknown:
        raise TypeError(f"unknown model-shape defaults: {sorted(unknown)}")
    d = {**MODEL_SHAPE, **defaults}
    parser.set_defaults(kv_ratio=kv_ratio)
    g = parser.add_argument_group("model shape (Qwen3-MoE, random weights)")
    g.add_argument("--layers", type=int, default=d["layers"], help="decoder layers (all MoE)")
    g.add_argument("--hidden", type=int, default=d["hidden"], help="hidden size")
    g.add_argument("--moe-intermediate", type=int, default=d["moe_intermediate"])
    g.add_argument("--experts", type=int, default=d["experts"], help="experts per layer")
    g.add_argument("--top-k", type=int, default=d["top_k"], help="experts routed per token")
    g.add_argument("--heads", type=int, default=d["heads"], help="attention heads")
    g.add_argument(
        "--kv-heads",
        type=int,
        default=d["kv_heads"],
        help=f"key/value heads (default: heads / {kv_ratio})"
        if d["kv_heads"] is None
        else "key/value heads",
    )
    g.add_argument("--head-dim", type=int, default=d["head_dim"])
    g.add_argument("--vocab", type=int, default=d["vocab"], help="vocabulary size")
    return g


def kv_heads(args: argparse.Namespace) -> int:
    if getattr(args, "kv_heads", None):
        return int(args.kv_heads)
    return max(1, args.heads // getattr(args, "kv_ratio", 8))


def model_shape(args: argparse.Namespace) -> dict[str, Any]:
    """The shape options as a dict (for the JSON results), kv heads resolved."""
    shape = {k: getattr(args, k) for k in SHAPE_KEYS}
    shape["kv_heads"] = kv_heads(args)
    return shape


def qwen3_config(args: argparse.Namespace, **overrides: Any) -> Any:
    """`Qwen3MoeConfig` of the shape options in `args` (`overrides` replace some of them).

    Every layer is MoE, dense MLP size 3 x hidden, untied embeddings, bf16 (the dtype a written
    checkpoint says; `build_on_device` sets its own), max positions 4096 or ``args.seq``."""
    from transformers import Qwen3MoeConfig

    a = argparse.Namespace(**{**vars(args), **overrides})
    return Qwen3MoeConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.hidden * 3,
        moe_intermediate_size=a.moe_intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=kv_heads(a),
        head_dim=a.head_dim,
        num_experts=a.experts,
        num_experts_per_tok=a.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        max_position_embeddings=max(4096, getattr(a, "seq", 0) or 0),
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The `torch.dtype` of a ``--dtype`` choice (bf16, fp16, fp32) or a `torch.dtype`."""
    from premoe.runtime import parse_dtype

    parsed = parse_dtype(dtype)
    if parsed is None:
        raise ValueError(f"no dtype to build with: {dtype!r}")
    return parsed


def build_on_device(config: Any, device: torch.device | str, dtype: str | torch.dtype) -> Any:
    """Random weights (seed 0), allocated and initialised on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    return model.eval()


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def random_token_ids(rows: int, seq: int, high: int, *, low: int = 10) -> list[list[int]]:
    """`rows` x `seq` token ids in [low, high), seed 0."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(low, high, (rows, seq), generator=g).tolist()


def write_layered_checkpoint(config: Any, folder: Path, device: torch.device) -> dict[str, Any]:
    """Random bf16 weights made on `device` one layer at a time, written as one safetensors
    shard per layer (+ one for the embeddings) in the per-expert hub layout; returns
    ``{"bytes", "seconds"}``. Router rows are drawn wider (std 0.5) so that routing is not flat."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(0)
    dt = torch.bfloat16
    h, i_moe, e = config.hidden_size, config.moe_intermediate_size, config.num_experts
    heads, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device, dtype=dt) * std).cpu()

    weight_map: dict[str, str] = {}
    total = 0
    n_shards = config.num_hidden_layers + 1

    def save(tensors: dict[str, torch.Tensor], index: int) -> None:
        nonlocal total
        name = f"model-{index + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()

    save(
        {
            "model.embed_tokens.weight": rnd(config.vocab_size, h),
            "lm_head.weight": rnd(config.vocab_size, h),
            "model.norm.weight": torch.ones(h, dtype=dt),
        },
        0,
    )
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        t: dict[str, torch.Tensor] = {
            p + "input_layernorm.weight": torch.ones(h, dtype=dt),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=dt),
            p + "self_attn.q_proj.weight": rnd(heads * hd, h),
            p + "self_attn.k_proj.weight": rnd(kv * hd, h),
            p + "self_attn.v_proj.weight": rnd(kv * hd, h),
            p + "self_attn.o_proj.weight": rnd(h, heads * hd),
            p + "self_attn.q_norm.weight": torch.ones(hd, dtype=dt),
            p + "self_attn.k_norm.weight": torch.ones(hd, dtype=dt),
            p + "mlp.gate.weight": rnd(e, h, std=0.5),
        }
        for part, shape in (("gate", (i_moe, h)), ("up", (i_moe, h)), ("down", (h, i_moe))):
            block = torch.randn(e, *shape, generator=g, device=device, dtype=dt).mul_(0.02).cpu()
            for x in range(e):  # own storage per tensor (safetensors refuses shared storage)
                t[p + f"mlp.experts.{x}.{part}_proj.weight"] = block[x].clone()
            del block
        save(t, layer + 1)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config.save_pretrained(folder)
    return {"bytes": total, "seconds": time.perf_counter() - t0}


# ---- device timing and memory ----------------------------------------------------------------


def sync(device: torch.device | None) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device, *, empty_cache: bool = False) -> None:
    """Start a new peak-memory window (CUDA); `empty_cache` also returns cached blocks."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if empty_cache:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Peak allocated device bytes since `reset_peak` (CUDA); None where not measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return None


class DeviceTimer:
    """``with DeviceTimer(device) as t: work()`` then ``t.seconds``: the block's wall time, with
    the device synchronised at both ends so that queued kernels count (None: no sync)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> DeviceTimer:
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0


def cuda_device(script: str) -> torch.device | None:
    """The CUDA device, or None after saying on stderr that `script` needs one."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    print(f"{script} needs a CUDA device", file=sys.stderr)
    return None


def graph_seconds(
    fn: Callable[[], Any], device: torch.device, calls: int = 1, replays: int = 20
) -> float:
    """Seconds per call of `fn`'s `calls` calls captured in one CUDA graph and replayed
    (warmed on a side stream first, as capture requires)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    with DeviceTimer(device) as t:
        for _ in range(replays):
            graph.replay()
    return t.seconds / replays / calls


def kernel_profile(
    run: Callable[[], Any],
    steps: int,
    top: int = 25,
    sequence: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """CUDA kernel time of `run()` (which runs `steps` steps), by kernel: the `top` largest
    as {kernel, count, us_per_step}. `sequence`, if given, gets the last step's kernels in launch
    order as {kernel, us, gap_us} (gap: idle device time before the kernel)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    if sequence is not None:
        spans = sorted(
            (e.time_range.start, e.time_range.end, e.name)
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
        )
        last = spans[len(spans) - len(spans) // steps :]
        for i, (start, end, name) in enumerate(last):
            gap = start - last[i - 1][1] if i else 0.0
            sequence.append({"kernel": name[:60], "us": end - start, "gap_us": gap})
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": e.key[:90], "count": e.count, "us_per_step": t / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:top]


def median_seconds(
    fn: Callable[[], Any], repeats: int, device: torch.device | None = None
) -> float:
    """Median wall seconds of `fn()` over `repeats` runs, each timed with `DeviceTimer`."""
    times = []
    for _ in range(repeats):
        with DeviceTimer(device) as t:
            fn()
        times.append(t.seconds)
    return statistics.median(times)


# ---- output ------------------------------------------------------------------------------------


def format_table(
    head: Sequence[str] | None, rows: Sequence[Sequence[Any]], *, align: str | None = None
) -> str:
    """Rows of already-formatted cells as aligned columns, two spaces apart, a dashed rule under
    the header (if any). `align`: one letter per column, ``l`` or ``r`` (default: the first
    column left, the others right)."""
    table = [list(map(str, r)) for r in ([head] if head is not None else []) + list(rows)]
    if not table:
        return ""
    ncol = max(len(r) for r in table)
    align = align or "l" + "r" * (ncol - 1)
    widths = [max(len(r[c]) for r in table if c < len(r)) for c in range(ncol)]

    def line(r: list[str]) -> str:
        cells = [
            cell.ljust(w) if a == "l" else cell.rjust(w)
            for cell, w, a in zip(r, widths, align, strict=False)
        ]
        return "  ".join(cells).rstrip()

    out = [line(r) for r in table]
    if head is not None:
        out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def print_table(
    head: Sequence[str] | None,
    rows: Sequence[Sequence[Any]],
    *,
    title: str | None = None,
    align: str | None = None,
) -> None:
    if title:
        print(f"\n{title}")
    print(format_table(head, rows, align=align))


def device_name(device: torch.device | str | None) -> str:
    device = torch.device(device) if device is not None else torch.device("cpu")
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def host_cpu() -> str:
    """The host's CPU model and core count (serving figures over HTTP are host-bound in part:
    two loans of the same card gave 1.3x apart at concurrency 64)."""
    name = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name
            )
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions (premoe, torch, transformers, faiss, Python), the device's name, the host CPU."""
    import transformers

    import premoe

    try:
        import faiss

        faiss_version: str | None = faiss.__version__
    except ImportError:
        faiss_version = None
    return {
        "premoe_version": premoe.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "faiss": faiss_version,
        "python": platform.python_version(),
        "device": device_name(device),
        "host_cpu": host_cpu(),
    }


def write_json(out: str | Path | None, data: dict[str, Any], *, device: Any = None) -> None:
    """Write `data` to `out` as indented JSON (nothing when `out` is None), after the
    `environment` of `device`; keys of `data` win (a run may report another process's device)."""
    if out is None:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**environment(device), **data}, indent=2, default=str) + "\n")
    print(f"wrote {out}")


# ---- misc --------------------------------------------------------------------------------------


# ---- HTTP clients of the serving benches ------------------------------------------------------


def http_client(url: str) -> Any:
    """An httpx client of one connection, for one simulated client of a load run. One shared
    client for hundreds of concurrent streams does not scale: httpcore's pool checks every
    connection for each request it places (`has_expired`, a socket call each), so at concurrency
    256 the load generator, not the server, set the pace (the server sat idle for seconds)."""
    import httpx

    limits = httpx.Limits(max_connections=1)
    return httpx.AsyncClient(base_url=url, timeout=600.0, limits=limits, verify=_tls_context())


@functools.cache
def _tls_context() -> Any:
    """One TLS context for every client: httpx loads the CA bundle per client otherwise (26 ms)."""
    import httpx

    return httpx.create_ssl_context()


async def stream_completion(
    client: Any, body: dict[str, Any], path: str = "/v1/completions"
) -> dict[str, Any]:
    """POST `body` (``"stream": true``) to `path` with the httpx `client`; returns ``{"status",
    "latency", "ttft", "tokens", "chunks"}``: seconds to the end of the stream, seconds to the
    first chunk that carries generated text (None when none did), completion tokens (the usage
    chunk's, with ``stream_options.include_usage``; else the content chunks) and content chunks.
    A non-200 answer gives ``{"status", "error"}``; a lost connection (reset, closed, timed out)
    gives status 0 and the error, so a load run counts it instead of dying."""
    import httpx

    t0 = time.perf_counter()
    ttft: float | None = None
    chunks = 0
    usage: int | None = None
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                error = (await r.aread()).decode(errors="replace")
                return {"status": r.status_code, "error": error}
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue  # blank separators, comments, "data: [DONE]"
                data = json.loads(line[6:])
                if data.get("usage"):
                    usage = int(data["usage"]["completion_tokens"])
                for choice in data.get("choices") or ():
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if text:
                        chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - t0
    except httpx.TransportError as e:
        return {"status": 0, "error": f"{type(e).__name__}: {e}"}
    latency = time.perf_counter() - t0
    tokens = usage if usage is not None else chunks
    return {"status": 200, "latency": latency, "ttft": ttft, "tokens": tokens, "chunks": chunks}


def percentile(xs: Sequence[float], p: float) -> float | None:
    """The `p`-th percentile (0-100, linear interpolation) of `xs`; None when `xs` is empty."""
    if not xs:
        return None
    if len(xs) == 1:
        return float(xs[0])
    return float(statistics.quantiles(xs, n=100, method="inclusive")[round(p) - 1])


def latency_summary(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """p50/p99 of latency and TTFT over the 200 answers of `stream_completion`, and how many
    of them had no content chunk (``ttft_missing``: their TTFT was not measured)."""
    ok = [r for r in results if r["status"] == 200]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {
        "latency_p50_s": percentile(lat, 50),
        "latency_p99_s": percentile(lat, 99),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "ttft_measured": len(ttft),
        "ttft_missing": len(ok) - len(ttft),
    }


def ms(seconds: float | None) -> str:
    """Seconds as whole milliseconds for a table; "-" for None (not measured)."""
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def start_demo_server(port: int, extra: list[str], *, timeout: float = 180.0) -> Any:
    """`premoe serve` of the bundled demo model and its shipped store (CPU, fp32, --keep 16) in a
    subprocess on 127.0.0.1:`port` with `extra` options; returns the process once /health
    answers 200 (a `RuntimeError` with its stderr if it dies first)."""
    import subprocess

    import httpx

    cmd = [
        sys.executable, "-m", "premoe_cli.app", "serve", str(ROOT / "premoe/demo/model"),
        "--store", str(ROOT / "patterns/demo"), "--keep", "16", "--device", "cpu",
        "--dtype", "fp32", "--port", str(port), *extra,
    ]  # fmt: skip
    path = [str(ROOT), str(ROOT / "cli"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "server died")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not become healthy within {timeout:.0f} s")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def max_rel_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x - y| / max |x| (in float64); inf when the shapes differ."""
    if x.shape != y.shape:
        return float("inf")
    x, y = x.double(), y.double()
    return float((x - y).abs().max()) / max(float(x.abs().max()), 1e-30)
