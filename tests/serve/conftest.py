"""Serve fixtures: a tiny Qwen3-MoE with a char tokenizer, a profiled two-task store, pruned
reference checkpoints exported per pattern, and the real server running in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from premoe.arch.routing import RoutingRule, route_from_logits
from premoe.demo.tasks import build_tokenizer, generate, write_jsonl
from premoe.serve import topk
from tests.helpers import greedy_text
from tests.tiny import build_tiny

API_KEY = "sk-premoe-test"
KEEP = 4  # of 8 experts, top-2 routed
MAX_LEN = 256
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)
TASKS = {"math": "add", "code": "reverse"}  # store task name -> demo task
PATTERNS = ("math", "code", "__global__")


@dataclass
class ServeWorld:
    root: Path
    model: Path
    store: Path
    exports: dict[str, Path]
    tokenizer: Any
    _refs: dict[str, Any] = field(default_factory=dict)
    _cache: dict[tuple[str, tuple[int, ...], int], str] = field(default_factory=dict)

    def reference(self, pattern: str) -> Any:
        """The exported pruned checkpoint of `pattern`, loaded by plain transformers."""
        from transformers import AutoModelForCausalLM

        if pattern not in self._refs:
            self._refs[pattern] = AutoModelForCausalLM.from_pretrained(
                self.exports[pattern], dtype=torch.float32
            ).eval()
        return self._refs[pattern]

    def greedy_ids(self, pattern: str, ids: list[int], max_new: int) -> str:
        """`generate(do_sample=False)` of the pattern's exported checkpoint, prompt alone."""
        key = (pattern, tuple(ids), max_new)
        if key not in self._cache:
            ref = self.reference(pattern)
            self._cache[key] = greedy_text(ref, self.tokenizer, ids, max_new)
        return self._cache[key]

    def greedy(self, pattern: str, prompt: str, max_new: int) -> str:
        return self.greedy_ids(pattern, self.tokenizer(prompt)["input_ids"], max_new)

    def greedy_chat(self, pattern: str, messages: list[dict[str, str]], max_new: int) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.greedy_ids(pattern, ids, max_new)


@pytest.fixture(scope="session")
def serve_world(tmp_path_factory: pytest.TempPathFactory) -> ServeWorld:
    from premoe.export import export_from_store
    from premoe.profile import profile

    root = tmp_path_factory.mktemp("serve")
    model_dir = root / "model"
    model = build_tiny("qwen3_moe", 0, vocab_size=128, max_position_embeddings=MAX_LEN)
    model.save_pretrained(model_dir)
    tok = build_tokenizer(MAX_LEN)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model_dir)
    sources = {}
    for name, demo in TASKS.items():
        sources[name] = write_jsonl(generate(demo, 32, 0, "profile"), root / f"{name}.jsonl")
    store = root / "store"
    profile(str(model_dir), sources, out=store, device="cpu", dtype="fp32")
    exports = {}
    for pattern in PATTERNS:
        out = root / f"export-{pattern}"
        if pattern == "__global__":
            export_from_store(model_dir, store, [], out, keep=KEEP, policy="global")
        else:
            export_from_store(model_dir, store, [pattern], out, keep=KEEP)
        exports[pattern] = out
    return ServeWorld(root, model_dir, store, exports, tok)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def client(self, **kw: Any) -> httpx.Client:
        kw.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.url, headers=self.headers(), **kw)

    def metrics(self) -> dict[str, float]:
        """Sample lines of /metrics as {'name{labels}': value}."""
        with self.client() as c:
            r = c.get("/metrics")
        assert r.status_code == 200
        out = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_server(
    world: ServeWorld,
    *extra: str,
    timeout: float = 60.0,
    model: Path | None = None,
    store: Path | None = None,
    keep: int = KEEP,
) -> Server:
    """`premoe serve` of the world's model and store (or `model` and `store`)."""
    port = free_port()
    log = world.root / f"server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "premoe_cli.app",
        "serve",
        str(model or world.model),
        "--store",
        str(store or world.store),
        "--keep",
        str(keep),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        *extra,
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return Server(url, proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not come up in {timeout} s:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(5)


@pytest.fixture(scope="session")
def server(serve_world: ServeWorld) -> Iterator[Server]:
    """The real `premoe serve` in a subprocess on a free port of 127.0.0.1."""
    srv = start_server(
        serve_world,
        "--api-key",
        API_KEY,
        "--max-batch",
        "4",
        "--max-wait-ms",
        "50",
        "--max-body-bytes",
        "65536",
    )
    yield srv
    stop_server(srv)


def mixed_on_cuda(
    source: Any, union: Any, patterns: Any, dtype: torch.dtype, quantize: Any = None
) -> tuple[Any, Any]:
    """The union of `patterns` resident on the GPU with the premoe_gemv experts (as serve holds
    it), and its per-row routing."""
    from premoe.load import ResidentModel
    from premoe.quant.gemv_experts import register
    from premoe.serve.rowmask import RowRouting

    resident = ResidentModel(
        source, union, device="cuda", dtype=dtype, quantize=quantize,
        experts_implementation=register(),
    )  # fmt: skip
    model = resident.model.eval()
    return model, RowRouting(model, source.arch, union, patterns)


def reference_route(
    x: torch.Tensor, k: int, scoring: int, renorm: bool, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `topk.route_topk` computes, in torch (the kernel needs CUDA or the interpreter)."""
    names = {
        topk.SOFTMAX: ("softmax", "scores"),
        topk.SIGMOID: ("sigmoid", "scores"),
        topk.TOPK_SOFTMAX: ("softmax", "logits_topk"),
    }
    rule = RoutingRule(*names[scoring], x.shape[1], k, renorm, scaling=scaling)
    w, idx = route_from_logits(x.float(), rule)
    return w.to(dtype), idx
