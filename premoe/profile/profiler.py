"""Running a model over token batches with router hooks (`run_profile`), and the model handle
that profiling loads lazily. `premoe.profile.api.profile` drives it end to end.

The model runs in padded batches (right padding, attention mask; padding tokens never count)
with hooks only on the routers (`hooks.RoutingRecorder`); every requested metric comes from the
same pass, and per-sample routing keys for both key kinds are taken along the way. Only the
decoder (`model.model`) runs: the LM head is never computed, since no metric needs it.

Shape legend: B batch, S padded sequence length, L MoE layers, E experts, N samples, D key dim.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from premoe.arch import ArchSpec, arch_for_config
from premoe.batching import (  # noqa: F401  (re-exported)
    input_device,
    iter_batches,
    pad_batch,
    pad_token_id,
)
from premoe.errors import UsageError
from premoe.fingerprint import fingerprint_model, fingerprint_source
from premoe.load.loader import load_full
from premoe.profile.corpus import TaskCorpus
from premoe.profile.hooks import Recorded, RoutingRecorder
from premoe.runtime import parse_dtype, pretrained_causal_lm, resolve_device
from premoe.source import load_tokenizer, resolve_model

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 512


@dataclass
class ProgressInfo:
    """Progress of a profiling run, reported after every batch."""

    task: str
    samples: int  # samples done, all tasks so far
    total_samples: int  # samples of all tasks
    tokens: int  # real (non-padding) tokens done
    tokens_per_s: float


Progress = Callable[[ProgressInfo], None]


def _is_model(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module) and hasattr(obj, "config")


class ModelHandle:
    """A model to profile: fingerprint and tokenizer at once, weights when `load()` is called."""

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        self.path: Path | None = None
        self._model: Any = None
        if _is_model(model):
            self._model = model
            self.config = model.config
            self.arch: ArchSpec = arch_for_config(model.config)
            self.fingerprint = fingerprint_model(model, self.arch)
            if tokenizer is None:
                raise UsageError("pass the tokenizer with an already-loaded model")
        else:
            src = resolve_model(model)
            try:
                self.path, self.config, self.arch = src.path, src.config, src.arch
                self.fingerprint = fingerprint_source(src)
            finally:
                src.close()
            if tokenizer is None:
                tokenizer = load_tokenizer(src.path)
        self.tokenizer = tokenizer

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(
        self,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        device_map: str | dict[str, Any] | None = None,
    ) -> Any:
        """The transformers model (loaded from the checkpoint on first call), in eval mode."""
        if self._model is None:
            self._model = load_causal_lm(
                self.path, device=device, dtype=dtype, device_map=device_map
            )
        return self._model


def load_causal_lm(
    path: str | Path | None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: str | dict[str, Any] | None = None,
) -> Any:
    """`AutoModelForCausalLM.from_pretrained` on a device (or an accelerate device map)."""

    if path is None:
        raise UsageError("no model path to load from")
    parsed = parse_dtype(dtype)
    torch_dtype = "auto" if parsed is None else parsed  # auto: transformers reads the checkpoint
    if device_map is None:
        device_map = {"": str(resolve_device(device))}
    elif device_map != "auto" and not isinstance(device_map, dict):
        raise UsageError(f"bad --device-map {device_map!r}; use auto")
    single = isinstance(device_map, dict) and set(device_map) == {""}
    if single and _quantized(path):
        # transformers' quantized kernels need downloads on a GPU; premoe's loader dequantizes
        # every format it declares, on any device (all experts kept: the full model)

        return load_full(path, device=device_map[""], dtype=parsed)
    log.info("loading %s (dtype %s, device map %s)", path, torch_dtype, device_map)
    model = pretrained_causal_lm(path, dtype=torch_dtype, device_map=device_map)
    return model.eval()


def _quantized(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    try:
        return "quantization_config" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def accumulated_rows(metrics: list[str]) -> tuple[str, ...]:
    """Rows the recorder sums for `metrics` (frequency comes from the always-kept counts)."""
    return tuple(m for m in metrics if m != "frequency")


def run_profile(
    model: Any,
    arch: ArchSpec,
    corpora: Mapping[str, TaskCorpus],
    *,
    tokenizer: Any,
    metrics: list[str],
    threshold: float = 0.0,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[str, Recorded]:
    """Run `model` over every task's samples; per task: [L, E] sums and per-sample keys."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    device = input_device(model)
    pad_id = pad_token_id(tokenizer, model.config)
    total = sum(c.samples for c in corpora.values())
    done_samples = done_tokens = 0
    start = time.perf_counter()
    out: dict[str, Recorded] = {}
    rows = accumulated_rows(metrics)
    with torch.inference_mode(), RoutingRecorder(model, arch, rows, threshold) as rec:
        for name, corpus in corpora.items():
            order: list[int] = []
            for ids, mask, sel in iter_batches(
                corpus.token_ids, batch_size, pad_id, pin=device.type == "cuda"
            ):
                ids = ids.to(device, non_blocking=True)
                mask = mask.to(device, non_blocking=True)
                rec.start_batch(mask)
                model.model(input_ids=ids, attention_mask=mask, use_cache=False)
                order.extend(sel)
                done_samples += len(sel)
                done_tokens += sum(len(corpus.token_ids[i]) for i in sel)
                if progress is not None:
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    progress(
                        ProgressInfo(name, done_samples, total, done_tokens, done_tokens / elapsed)
                    )
            out[name] = in_corpus_order(rec.collect(), order)
    return out


def in_corpus_order(recorded: Recorded, order: list[int]) -> Recorded:
    """`recorded` with its per-sample keys [N, D] moved from batch order to corpus order
    (`order[j]`: the corpus index of key row j)."""
    inverse = torch.from_numpy(np.argsort(np.asarray(order)))  # batch order -> corpus order
    recorded.keys = {k: v[inverse] for k, v in recorded.keys.items()}
    return recorded
