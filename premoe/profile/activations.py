"""Activations of layer-sequential profiling: nested layer arguments flattened to tensors, and
the store that keeps them on the host (pinned when the device is CUDA) up to a byte budget,
then in safetensors files under an offload folder.

Shape legend: B batch, S padded sequence length, H hidden size.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from premoe.errors import UsageError
from premoe.policy import human_bytes

log = logging.getLogger(__name__)


# ---- nested values (keyword arguments of a decoder layer) ---------------------------------------


class _Leaf:
    """Marks where a tensor was in a flattened value."""

    __slots__ = ()


_LEAF = _Leaf()


def _map_leaves(value: Any, is_leaf: Callable[[Any], bool], fn: Callable[[Any], Any]) -> Any:
    """`value` with each leaf (`is_leaf`) replaced by `fn(leaf)`, in depth-first order, through
    tuples (named ones too), lists and dicts; anything else is kept as it is."""

    def go(v: Any) -> Any:
        if is_leaf(v):
            return fn(v)
        if isinstance(v, tuple) and hasattr(v, "_fields"):  # named tuple
            return type(v)(*[go(x) for x in v])
        if isinstance(v, (tuple, list)):
            return type(v)(go(x) for x in v)
        if isinstance(v, dict):
            return {k: go(x) for k, x in v.items()}
        return v

    return go(value)


def flatten(value: Any) -> tuple[list[torch.Tensor], Any]:
    """(tensors, spec): `value` (a tensor, a tuple/list/dict of them, or anything else) with its
    tensors taken out; `unflatten(spec, tensors)` puts them back."""
    leaves: list[torch.Tensor] = []

    def take(t: torch.Tensor) -> _Leaf:
        leaves.append(t)
        return _LEAF

    spec = _map_leaves(value, lambda v: isinstance(v, torch.Tensor), take)
    return leaves, spec


def unflatten(spec: Any, leaves: Iterable[torch.Tensor]) -> Any:
    it = iter(leaves)
    return _map_leaves(spec, lambda v: v is _LEAF, lambda _: next(it))


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- activation store: host (pinned) first, then disk -------------------------------------------


class ActivationStore:
    """Named lists of tensors kept on the host while they fit `budget` bytes, else on disk.

    A name keeps its place once chosen (host or disk). On CUDA, host copies go to pinned buffers
    that are reused in place when the same name is stored again with the same shapes, copied
    without blocking (stream order makes a later `get` see them). On the CPU the tensors are kept
    as they are (no copy).
    """

    def __init__(
        self, device: torch.device, budget: int, offload_dir: str | Path | None = None
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.budget = int(budget)
        self.offload_dir = Path(offload_dir) if offload_dir is not None else None
        self._host: dict[str, list[torch.Tensor]] = {}
        self._disk: dict[str, Path] = {}
        self._tmp: Path | None = None
        self.host_bytes = 0
        self.disk_bytes = 0
        self.bytes_written = 0  # to disk, all puts
        self.bytes_read = 0  # from disk, all gets

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._host.clear()
        self._disk.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _folder(self) -> Path:
        if self._tmp is None:
            assert self.offload_dir is not None
            self.offload_dir.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix="premoe-activations-", dir=self.offload_dir))
        return self._tmp

    def put(self, name: str, tensors: Sequence[torch.Tensor]) -> None:
        nbytes = _nbytes(tensors)
        if name in self._host:
            self._put_host(name, tensors)
        elif name in self._disk:
            self._put_disk(name, tensors)
        elif self.host_bytes + nbytes <= self.budget:
            self.host_bytes += nbytes
            self._put_host(name, tensors)
        elif self.offload_dir is not None:
            self.disk_bytes += nbytes
            self._disk[name] = self._folder() / f"{len(self._disk)}.safetensors"
            self._put_disk(name, tensors)
        else:
            raise UsageError(
                f"activations exceed the host budget of {human_bytes(self.budget)}; pass "
                "--offload-dir DIR to spill them to disk, or raise --host-budget"
            )

    def _put_host(self, name: str, tensors: Sequence[torch.Tensor]) -> None:
        if not self.cuda:
            self._host[name] = [t if t.device.type == "cpu" else t.cpu() for t in tensors]
            return
        old = self._host.get(name)
        same = old is not None and [(o.shape, o.dtype) for o in old] == [
            (t.shape, t.dtype) for t in tensors
        ]
        if not same:
            old = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            self._host[name] = old
        assert old is not None
        for dst, src in zip(old, tensors, strict=True):
            dst.copy_(src, non_blocking=True)

    def _put_disk(self, name: str, tensors: Sequence[torch.Tensor]) -> None:
        from safetensors.torch import save_file

        data = {str(i): t.detach().to("cpu").contiguous() for i, t in enumerate(tensors)}
        save_file(data, str(self._disk[name]))
        self.bytes_written += _nbytes(data.values())

    def get(self, name: str) -> list[torch.Tensor]:
        """The tensors of `name` on the store's device."""
        if name in self._host:
            return [t.to(self.device, non_blocking=True) for t in self._host[name]]
        from safetensors import safe_open

        with safe_open(str(self._disk[name]), framework="pt") as f:
            out = [f.get_tensor(str(i)) for i in range(len(f.keys()))]
        self.bytes_read += _nbytes(out)
        return [t.to(self.device) for t in out]
