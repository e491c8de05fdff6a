"""A host-memory cache of expert tensors (LRU, pinned when CUDA is present).

Swapping an expert in from this cache is one asynchronous host-to-device copy per expert tensor
at full PCIe/NVLink-C2C bandwidth; from the checkpoint it is a page-cache read, a copy into
pinned staging memory and then the transfer. An entry is one expert of one layer, in the model's
in-memory layout and dtype: a tuple with one tensor per `ArchSpec.experts` entry (e.g.
`gate_up [2I, H]`, `down [H, I]`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from premoe.errors import UsageError
from premoe.policy import parse_bytes

log = logging.getLogger(__name__)

Entry = tuple[torch.Tensor, ...]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    inserts: int = 0
    evictions: int = 0


class HostExpertCache:
    """LRU cache of experts in host memory, bounded by `budget` bytes.

    `pin=None` pins when CUDA is available. Entries are keyed by (layer, original expert id).
    Evicting an entry whose tensors are still being copied is safe: pinned blocks go back to
    torch's caching host allocator, which reuses them only after the copies that read them end.
    """

    def __init__(self, budget: int | str, *, pin: bool | None = None) -> None:
        self.budget = parse_bytes(budget)
        if self.budget <= 0:
            raise UsageError("the host expert cache budget must be positive (e.g. 8GiB)")
        self.pin = torch.cuda.is_available() if pin is None else bool(pin)
        self.nbytes = 0
        self.stats = CacheStats()
        self._entries: OrderedDict[tuple[int, int], Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[tuple[int, int]]:
        """Cached (layer, expert) pairs, least recently used first."""
        return list(self._entries)

    @staticmethod
    def entry_bytes(tensors: Sequence[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    def check_fits(self, expert_bytes: int) -> None:
        """Raise if the budget cannot hold even one expert of `expert_bytes`."""
        if expert_bytes > self.budget:
            raise UsageError(
                f"the host expert cache budget ({self.budget / 2**20:.1f} MiB) cannot hold one "
                f"expert ({expert_bytes / 2**20:.1f} MiB); raise the budget or use no cache"
            )

    def get(self, layer: int, expert: int) -> Entry | None:
        key = (layer, expert)
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry

    def put(self, layer: int, expert: int, tensors: Sequence[torch.Tensor]) -> bool:
        """Insert (or refresh) an entry; evicts least recently used ones. False if it cannot fit."""
        key = (layer, expert)
        size = self.entry_bytes(tensors)
        if size > self.budget:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= self.entry_bytes(old)
        while self.nbytes + size > self.budget and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= self.entry_bytes(evicted)
            self.stats.evictions += 1
        self._entries[key] = tuple(tensors)
        self.nbytes += size
        self.stats.inserts += 1
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def __repr__(self) -> str:
        return (
            f"HostExpertCache({len(self)} experts, {self.nbytes / 2**30:.2f}/"
            f"{self.budget / 2**30:.2f} GiB, pinned={self.pin})"
        )
