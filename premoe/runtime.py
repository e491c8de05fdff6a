"""The ``--device`` and ``--dtype`` options: one meaning for every command and API function.

Device (`resolve_device`):

- ``auto`` (or None): ``cuda`` when CUDA is available, else ``cpu``;
- ``cpu``, ``cuda``, ``cuda:N`` (case and surrounding spaces ignored), or a `torch.device` of
  those types: CUDA must be available, and N below the number of CUDA devices. A bare ``cuda``
  stays index-less (the current CUDA device);
- anything else: `UsageError`.

Dtype (`parse_dtype`, `resolve_dtype`):

- ``bf16``/``bfloat16``, ``fp16``/``float16``/``half``, ``fp32``/``float32``/``float``, or a
  `torch.dtype`;
- ``auto`` (or None): the checkpoint's own dtype, the one ``from_pretrained(dtype="auto")`` picks:
  the config's ``dtype`` when it names one, else the dtype of the first floating-point tensor in
  the checkpoint, else fp32. `parse_dtype` leaves it unresolved (None: for callers that hand
  ``"auto"`` to transformers); `resolve_dtype(dtype, source)` resolves it from the source;
- anything else: `UsageError`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from premoe.errors import UsageError

if TYPE_CHECKING:
    from premoe.source import ModelSource

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The `torch.device` of a ``--device`` value (rules in the module docstring)."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device.strip().lower())
    except (RuntimeError, ValueError, AttributeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"device {str(device)!r} asked for but CUDA is not available; use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s)"
            )
    return dev


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The `torch.dtype` of a ``--dtype`` value; None for ``auto`` (not resolved here)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    text = "auto" if dtype is None else str(dtype).strip().lower()
    if text == "auto":
        return None
    try:
        return DTYPES[text]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32") from None


def resolve_dtype(dtype: str | torch.dtype | None, source: ModelSource) -> torch.dtype:
    """The `torch.dtype` of a ``--dtype`` value, ``auto`` resolved from `source` (its config,
    else its checkpoint's first floating-point tensor, else fp32)."""
    parsed = parse_dtype(dtype)
    if parsed is not None:
        return parsed
    cfg = getattr(source.config, "dtype", None)
    if isinstance(cfg, str):
        cfg = getattr(torch, cfg, None)
    if isinstance(cfg, torch.dtype):
        return cfg
    for key in source.reader.keys():
        dt = source.reader.dtype(key)
        if dt.is_floating_point:
            return dt
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16": the first ``--dtype`` spelling of `dtype` in `DTYPES`."""
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA); nothing on the CPU. For timings."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (a small host tensor) on `device` without blocking the host: a pinned, non-blocking
    copy on CUDA (a pageable copy would wait for all the work queued before it)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# transformers (5.x) patches `PreTrainedModel` class attributes while it builds a model
# (`initialization.no_tie_weights`, `no_init_weights`) and restores them after; two threads
# building at once can leave them patched for good (every later model comes out untied). premoe
# builds one model at a time per process.
_BUILD_LOCK = threading.RLock()


@contextmanager
def building_models() -> Iterator[None]:
    """Hold around any transformers model construction (see `_BUILD_LOCK`)."""
    with _BUILD_LOCK:
        yield


def pretrained_causal_lm(path: str | Path, **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)`, one build at a time."""
    from transformers import AutoModelForCausalLM

    with building_models():
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
