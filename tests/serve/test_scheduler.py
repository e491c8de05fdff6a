"""Scheduling policy: batches share a pattern, the resident pattern is preferred, waiting is
bounded (no starvation), cancelled requests never run."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from premoe.serve.scheduler import Scheduler


@dataclass(eq=False)
class Item:
    task: str
    arrival: float
    cancelled: bool = False


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(max_batch: int = 4, max_wait: float = 1.0) -> tuple[Scheduler[Item], Clock]:
    clock = Clock()
    return Scheduler(max_batch, max_wait, clock=clock), clock


def test_batches_share_a_pattern_fifo_up_to_max_batch() -> None:
    s, clock = make(max_batch=3)
    items = [Item("a" if i % 2 else "b", arrival=i * 0.01) for i in range(10)]
    for it in items:
        s.put(it)
    clock.t = 0.2
    seen = []
    while (batch := s.next_batch(None)) is not None:
        assert len(batch.items) <= 3
        assert {it.task for it in batch.items} == {batch.task}
        assert [it.arrival for it in batch.items] == sorted(it.arrival for it in batch.items)
        seen.extend(batch.items)
    assert sorted(id(i) for i in seen) == sorted(id(i) for i in items)
    assert s.depth() == 0


def test_resident_pattern_preferred_until_another_is_overdue() -> None:
    s, clock = make(max_batch=2, max_wait=1.0)
    s.put(Item("b", 0.0))  # older, but not resident
    s.put(Item("a", 0.5))
    clock.t = 0.9
    assert s.next_batch("a").task == "a"  # no swap while nothing is overdue
    s.put(Item("a", 0.95))
    clock.t = 1.2  # b has waited 1.2 s > 1.0: its turn, even though a is resident
    batch = s.next_batch("a")
    assert batch.task == "b" and batch.overdue
    assert s.next_batch("b").task == "a"


def test_oldest_overdue_first_and_no_resident_goes_by_age() -> None:
    s, clock = make(max_wait=0.5)
    s.put(Item("x", 0.3))
    s.put(Item("y", 0.1))
    s.put(Item("z", 0.2))
    clock.t = 0.35  # nothing overdue, no resident: oldest head
    assert s.choose(None) == ("y", False)
    clock.t = 2.0  # all overdue: oldest head first
    assert [s.next_batch("x").task for _ in range(3)] == ["y", "z", "x"]


@pytest.mark.parametrize("max_wait", [0.0, 0.25, 1.0])
def test_waiting_is_bounded_under_a_constant_stream(max_wait: float) -> None:
    """A steady stream for the resident pattern cannot starve another pattern: its request
    runs within max_wait plus one batch (nothing older than it is waiting)."""
    batch_time = 0.1
    s, clock = make(max_batch=2, max_wait=max_wait)
    victim = Item("rare", 0.0)
    s.put(victim)
    resident = "hot"
    for i in range(4):
        s.put(Item("hot", 0.001 + i * 0.001))
    served_at = None
    for step in range(1000):
        clock.t = step * batch_time
        for _ in range(2):  # two new hot requests per batch: the hot queue never empties
            s.put(Item("hot", clock.t))
        batch = s.next_batch(resident)
        assert batch is not None
        resident = batch.task
        if victim in batch.items:
            served_at = clock.t
            break
    assert served_at is not None
    assert served_at - victim.arrival <= max_wait + batch_time + 1e-9


def test_cancelled_and_removed_items_never_run() -> None:
    s, clock = make()
    a, b, c = Item("t", 0.0), Item("t", 0.1), Item("u", 0.2)
    for it in (a, b, c):
        s.put(it)
    a.cancelled = True
    assert s.remove(c) and not s.remove(c)
    clock.t = 0.3
    batch = s.next_batch(None)
    assert batch.items == [b]
    assert s.next_batch(None) is None
    assert s.depth() == 0 and s.depth_by_task() == {}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Scheduler(0, 1.0)
    with pytest.raises(ValueError):
        Scheduler(1, -1.0)


def test_an_item_put_back_goes_before_newer_ones() -> None:
    """A rerouted request, put back under its new pattern, is served before requests of that
    pattern that arrived after it (miss.py)."""
    s, _ = make()
    newer = [Item("b", arrival=1.0 + i) for i in range(3)]
    for it in newer:
        s.put(it)
    old = Item("b", arrival=0.5)
    s.put(old)
    assert s.pop_oldest() is old
    assert s.pop("b", 3) == newer
