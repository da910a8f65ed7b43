"""The read-ahead schedule of the pipeline: memory budget, shard acquisition and release, prefetch."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from nvfp4_convert import pipeline


class _Source:
    def __init__(self):
        self.events: list[tuple[str, str]] = []

    def acquire(self, name, *, checked=True):
        self.events.append(("acquire", name))
        return Path(name)

    def check(self, name):
        self.events.append(("check", name))

    def prefetch(self, name):
        self.events.append(("prefetch", name))

    def release(self, name):
        self.events.append(("release", name))


@pytest.fixture
def ahead(monkeypatch):
    monkeypatch.setattr(pipeline, "_load", lambda unit, *args: unit)  # no tensors: the schedule alone
    source = _Source()
    schedule = pipeline._ReadAhead(
        source=source, plan=SimpleNamespace(source_shards=["a", "b", "c"]), units=["u0", "u1", "u2", "u3"],
        sources=[frozenset("a"), frozenset("a"), frozenset("b"), frozenset("c")], sizes=[10, 10, 10, 10],
        budget=25, backend=SimpleNamespace(device="cpu"))
    yield schedule, source
    schedule.close()


def test_admission_within_budget_and_only_from_held_shards(ahead):
    schedule, source = ahead
    schedule.fill(may_acquire=True)
    assert [p for p, _ in schedule.pending] == [0, 1]  # u2 would exceed the budget (30 > 25)
    assert source.events == [("acquire", "a"), ("prefetch", "b")]
    assert schedule.take(0) == "u0"
    schedule.done(0)
    schedule.fill(may_acquire=False)
    assert [p for p, _ in schedule.pending] == [1]  # within budget now, but u2 needs shard b: not while u1 waits
    assert schedule.releasable(0) == []  # u1 still reads a


def test_shards_are_released_after_their_last_reader(ahead):
    schedule, source = ahead
    schedule.fill(may_acquire=True)
    for pos in (0, 1):
        schedule.take(pos)
        schedule.done(pos)
    assert schedule.releasable(1) == ["a"]
    schedule.release(["a"])
    schedule.fill(may_acquire=True)
    assert [p for p, _ in schedule.pending] == [2]
    assert source.events == [("acquire", "a"), ("prefetch", "b"), ("release", "a"), ("acquire", "b"),
                             ("prefetch", "c")]
    assert schedule.paths(2) == {"b": Path("b")}


def test_a_unit_larger_than_the_budget_still_runs_alone(monkeypatch):
    monkeypatch.setattr(pipeline, "_load", lambda unit, plan, paths, whole, *args: (unit, whole))
    schedule = pipeline._ReadAhead(
        source=_Source(), plan=SimpleNamespace(source_shards=["a"]), units=["big", "small"],
        sources=[frozenset("a"), frozenset("a")], sizes=[100, 1], budget=25, backend=SimpleNamespace(device="cpu"))
    try:
        schedule.fill(may_acquire=True)
        assert [p for p, _ in schedule.pending] == [0]  # nothing else joins an over-budget unit
        assert schedule.take(0) == ("big", False)  # and it is mapped a tensor at a time, not loaded whole
    finally:
        schedule.close()
