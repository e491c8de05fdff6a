"""Which pattern runs next: per-pattern FIFO queues, batching, and a bound on waiting.

The decode worker owns the model and runs one batch at a time; every request in a batch shares
one pattern (one expert set), and the resident expert set changes only between batches. The
scheduler decides, each time the worker is free, which pattern's requests form the next batch:

1. A pattern whose oldest request has waited longer than `max_wait_s` is *overdue*. If any
   pattern is overdue, the overdue pattern whose oldest request has waited longest runs next, even
   if that costs a swap. This bounds every request's wait by about `max_wait_s` plus the length
   of one batch per pattern ahead of it (no starvation).
2. Otherwise, if the resident pattern has requests waiting, it runs (no swap).
3. Otherwise the pattern whose oldest request has waited longest runs.

A batch takes up to `max_batch` requests of that pattern, oldest first. Cancelled requests
(client gone) are dropped from the queues without running.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Schedulable(Protocol):
    @property
    def task(self) -> str: ...

    @property
    def arrival(self) -> float: ...  # time.monotonic() at arrival

    @property
    def cancelled(self) -> bool: ...


T = TypeVar("T", bound=Schedulable)


@dataclass
class Batch(Generic[T]):
    task: str
    items: list[T]
    overdue: bool  # chosen because its oldest request waited past max_wait_s


class Scheduler(Generic[T]):
    """Thread-safe per-pattern queues; `next_batch` implements the policy above."""

    def __init__(
        self,
        max_batch: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must be >= 0")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._queues: dict[str, deque[T]] = {}
        self._lock = threading.Lock()

    # -- producers -------------------------------------------------------------------------------
    def put(self, item: T) -> None:
        """Queue `item` in arrival order (an item put back, e.g. a rerouted request, goes
        before the newer ones)."""
        with self._lock:
            q = self._queues.setdefault(item.task, deque())
            i = len(q)
            while i > 0 and q[i - 1].arrival > item.arrival:
                i -= 1
            q.insert(i, item)

    def remove(self, item: T) -> bool:
        """Take a waiting item out (a client that left); False when it is not queued."""
        with self._lock:
            q = self._queues.get(item.task)
            if q is None:
                return False
            try:
                q.remove(item)
            except ValueError:
                return False
            if not q:
                del self._queues[item.task]
            return True

    # -- state -----------------------------------------------------------------------------------
    def depth(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._queues.values())

    def depth_by_task(self) -> dict[str, int]:
        with self._lock:
            return {t: len(q) for t, q in self._queues.items()}

    # -- consumer --------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        for task in list(self._queues):
            q = self._queues[task]
            live = deque(i for i in q if not i.cancelled)
            if live:
                self._queues[task] = live
            else:
                del self._queues[task]

    def choose(self, resident: str | None) -> tuple[str, bool] | None:
        """(task, overdue) of the next batch, or None when nothing waits."""
        with self._lock:
            return self._choose(resident)

    def _choose(self, resident: str | None) -> tuple[str, bool] | None:
        self._drop_cancelled()
        if not self._queues:
            return None
        now = self._clock()
        heads = {task: q[0].arrival for task, q in self._queues.items()}  # oldest per task
        overdue = [t for t, a in heads.items() if now - a > self.max_wait_s]
        if overdue:
            return min(overdue, key=lambda t: heads[t]), True
        if resident is not None and resident in heads:
            return resident, False
        return min(heads, key=lambda t: heads[t]), False

    def pop(self, task: str, n: int) -> list[T]:
        """Up to `n` waiting requests of `task`, oldest first (continuous batching)."""
        with self._lock:
            q = self._queues.get(task)
            if q is None:
                return []
            items = [q.popleft() for _ in range(min(n, len(q)))]
            if not q:
                del self._queues[task]
            return items

    def pop_oldest(self) -> T | None:
        """The request that has waited longest, of any pattern (mixed batches)."""
        with self._lock:
            self._drop_cancelled()
            if not self._queues:
                return None
            task = min(self._queues, key=lambda t: self._queues[t][0].arrival)
            q = self._queues[task]
            item = q.popleft()
            if not q:
                del self._queues[task]
            return item

    def next_batch(self, resident: str | None) -> Batch[T] | None:
        """Pop the next batch (up to `max_batch` requests of one pattern), or None."""
        with self._lock:
            choice = self._choose(resident)
            if choice is None:
                return None
            task, overdue = choice
            q = self._queues[task]
            items = [q.popleft() for _ in range(min(self.max_batch, len(q)))]
            if not q:
                del self._queues[task]
            return Batch(task, items, overdue)
