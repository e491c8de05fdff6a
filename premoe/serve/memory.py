"""How the server spends device memory: resident weights, KV slots and activation headroom.

The memory the server may use (`allowed`):

- `--budget B`: B bytes for everything the engine allocates, weights + KV cache + activation
  headroom. A K derived from the budget leaves room for `min_kv_slots` slots and the headroom
  (`reserve`).
- `--keep K` alone: what the device offers when the engine starts: on CUDA the free memory times
  `kv_memory_fraction`, on a CPU the available host memory (MemAvailable) times the same share;
  unknown (no check) where neither can be read.

Before the weights are loaded, `choose_mode` decides whether the patterns are served mixed (the
union of their experts resident, per-row router masks) or swapped (one pattern resident): mixed
only when the union's weights + the headroom + `min_kv_slots` KV slots fit `allowed`. After
loading, `kv_slots` gives the continuous decoder what is left: (allowed - resident weights -
headroom) / bytes per slot, capped by `--max-batch`.

Shape legend: T tokens of one forward, H hidden size, I expert intermediate size, E experts per
layer, V vocabulary, N KV slots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from premoe.errors import UsageError
from premoe.policy import human_bytes, parse_bytes
from premoe.serve import kvcache
from premoe.sizes import SizeModel
from premoe.source import ModelSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Allowed:
    """The bytes the engine may allocate on its device, and where that figure comes from."""

    nbytes: int | None  # None: unknown, nothing is checked
    source: str  # "--budget", "free device memory x 0.9", ...


def allowed_bytes(budget: str | int | None, device: torch.device, fraction: float) -> Allowed:
    """The memory the engine may use (module docstring); read before the weights are loaded."""
    if budget is not None:
        return Allowed(parse_bytes(budget), "--budget")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return Allowed(int(free * fraction), f"free device memory x {fraction:g}")
    if device.type == "cpu":
        avail = _mem_available()
        if avail is not None:
            return Allowed(int(avail * fraction), f"available host memory x {fraction:g}")
    return Allowed(None, "unknown (not checked)")


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def activation_headroom(
    config: Any, *, rows: int, prefill_tokens: int, max_len: int, dtype: torch.dtype
) -> int:
    """An upper estimate of the activations of one forward of the continuous decoder: T =
    prefill_tokens + rows tokens through one layer at a time (hidden states, attention
    projections, routed expert intermediates, router scores), one layer's attention scores
    [T, heads, max_len] in fp32, and the last-position logits [rows, V] (model dtype + fp32)."""
    item = torch.empty((), dtype=dtype).element_size()
    h = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    inter = int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)
    top_k = int(getattr(config, "num_experts_per_tok", None) or 1)
    experts = int(
        getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 1
    )
    vocab = int(config.vocab_size)
    t = prefill_tokens + rows
    per_token = item * (8 * h + 2 * heads * head_dim + top_k * (3 * inter + h)) + 8 * experts
    scores = t * heads * max_len * 4
    logits = rows * vocab * (item + 4)
    return t * per_token + scores + logits


def weights_bytes(src: ModelSource, dtype: torch.dtype, k: int, quantize: Any = None) -> int:
    """Resident bytes of `src` with `k` experts per MoE layer, as premoe's loader holds them."""
    model = SizeModel.from_source(src)
    if quantize is None:
        return model.at_dtype(dtype).resident(k)
    sizes = model.at_dtype(
        dtype, quantize.scheme, block=quantize.block, group_size=quantize.group_size
    )
    return sizes.resident(k)


@dataclass(frozen=True)
class MemoryPlan:
    """The engine's memory arithmetic for one configuration (module docstring)."""

    allowed: Allowed
    per_slot: int  # KV bytes of one request slot
    headroom: int  # activation headroom of one forward
    min_slots: int  # KV slots that must fit beside the weights

    @property
    def reserve(self) -> int:
        """What a budget keeps aside from the weights: headroom + `min_slots` KV slots."""
        return self.headroom + self.min_slots * self.per_slot

    def weights_budget(self) -> int | None:
        """The part of --budget left for the weights (None without --budget)."""
        if self.allowed.source != "--budget" or self.allowed.nbytes is None:
            return None
        left = self.allowed.nbytes - self.reserve
        if left <= 0:
            raise UsageError(
                f"--budget {human_bytes(self.allowed.nbytes)} does not even hold the activation "
                f"headroom ({human_bytes(self.headroom)}) and {self.min_slots} KV slots "
                f"({human_bytes(self.min_slots * self.per_slot)}); raise it, or lower "
                "--max-model-len, --prefill-tokens or --min-kv-slots"
            )
        log.info(
            "--budget %s: %s for the weights, %s kept for %d KV slots and activations",
            human_bytes(self.allowed.nbytes),
            human_bytes(left),
            human_bytes(self.reserve),
            self.min_slots,
        )
        return left

    def choose_mode(self, union_weights: int, forced: bool) -> tuple[bool, str]:
        """(mixed, why): mixed when the union's weights + headroom + `min_slots` KV slots fit
        `allowed`; `forced` (--mixed on) turns a misfit into a `UsageError`."""
        need = union_weights + self.reserve
        nbytes, source = self.allowed.nbytes, self.allowed.source
        if nbytes is None or need <= nbytes:
            room = "not checked" if nbytes is None else f"<= {human_bytes(nbytes)}, {source}"
            return True, f"the union and {self.min_slots} KV slots fit ({human_bytes(need)} {room})"
        why = (
            f"the union of the patterns ({human_bytes(union_weights)}) + activation headroom "
            f"({human_bytes(self.headroom)}) + {self.min_slots} KV slots "
            f"({human_bytes(self.min_slots * self.per_slot)}) = {human_bytes(need)} exceeds "
            f"{human_bytes(nbytes)} ({source})"
        )
        if forced:
            raise UsageError(f"--mixed on is not possible: {why}; raise --budget or lower --keep")
        return False, why


def make_plan(
    config: Any,
    *,
    budget: str | None,
    device: torch.device,
    dtype: torch.dtype,
    fraction: float,
    max_batch: int,
    min_kv_slots: int,
    prefill_tokens: int,
    max_len: int,
) -> MemoryPlan:
    """The `MemoryPlan` of a model `config` served with these options (before loading)."""
    return MemoryPlan(
        allowed=allowed_bytes(budget, device, fraction),
        per_slot=kvcache.bytes_per_slot(config, max_len, dtype),
        headroom=activation_headroom(
            config, rows=max_batch, prefill_tokens=prefill_tokens, max_len=max_len, dtype=dtype
        ),
        min_slots=max(1, min(max_batch, min_kv_slots)),
    )


def kv_slots(
    *, allowed: int | None, resident: int, headroom: int, per_slot: int, max_batch: int
) -> int:
    """KV slots that fit beside `resident` weights and the headroom, at most `max_batch`;
    `max_batch` when nothing is known; a `UsageError` when not even one fits."""
    if allowed is None:
        return max_batch
    fit = (allowed - resident - headroom) // per_slot
    if fit < 1:
        raise UsageError(
            f"no memory left for the KV cache: {human_bytes(allowed)} allowed, "
            f"{human_bytes(resident)} of weights, {human_bytes(headroom)} activation headroom, "
            f"{human_bytes(per_slot)} per request slot; raise --budget, or lower --keep or "
            "--max-model-len"
        )
    if fit < max_batch:
        log.warning(
            "KV cache: %d slots fit in the memory left (not --max-batch %d)", fit, max_batch
        )
    return int(min(max_batch, fit))
