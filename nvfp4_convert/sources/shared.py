"""One source read by several consumers at once (calibration and conversion), each shard acquired once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .base import Source


class SharedShards:
    """Hands out views of ``source`` that share its shards.

    Each consumer claims (:meth:`claim`) the shards it will read: a set, from which its ``release`` of a shard
    removes it (and acquiring one adds it), or a predicate it keeps up to date itself. A shard is acquired
    from the source the first time any view asks for it and released to the source (a downloaded copy
    deleted) once no consumer claims it any more. So a shard two consumers read is downloaded once, and stays
    only while one of them still has to read it.
    """

    def __init__(self, source: Source):
        self.source = source
        self.claims: dict[str, set[str] | Callable[[str], bool]] = {}  # consumer -> the shards it will read
        self.held: dict[str, Path] = {}

    def claim(self, consumer: str, shards: set[str] | Callable[[str], bool]) -> None:
        self.claims[consumer] = set(shards) if not callable(shards) else shards

    def view(self, consumer: str) -> _View:
        return _View(self, consumer)

    def _claimed(self, shard: str) -> bool:
        return any(c(shard) if callable(c) else shard in c for c in self.claims.values())

    def acquire(self, consumer: str, shard: str, *, checked: bool = True) -> Path:
        claim = self.claims.setdefault(consumer, set())
        if not callable(claim):
            claim.add(shard)
        if shard not in self.held:
            self.held[shard] = self.source.acquire(shard, checked=checked)
        elif checked:
            self.source.check(shard)
        return self.held[shard]

    def prefetch(self, shard: str) -> None:
        if shard not in self.held:
            self.source.prefetch(shard)

    def release(self, consumer: str, shard: str) -> None:
        claim = self.claims.get(consumer)
        if claim is not None and not callable(claim):
            claim.discard(shard)
        if shard in self.held and not self._claimed(shard):
            del self.held[shard]
            self.source.release(shard)

    def finish(self, consumer: str) -> None:
        """``consumer`` reads nothing more: give up its claims."""
        self.claims.pop(consumer, None)
        for shard in [s for s in self.held if not self._claimed(s)]:
            del self.held[shard]
            self.source.release(shard)


class _View:
    """The source as one consumer sees it: shard calls go through the :class:`SharedShards`, the rest to the
    source itself."""

    def __init__(self, shared: SharedShards, consumer: str):
        self._shared, self._consumer = shared, consumer

    def __getattr__(self, name: str):
        return getattr(self._shared.source, name)

    def acquire(self, filename: str, *, checked: bool = True) -> Path:
        return self._shared.acquire(self._consumer, filename, checked=checked)

    def prefetch(self, filename: str) -> None:
        self._shared.prefetch(filename)

    def release(self, filename: str) -> None:
        self._shared.release(self._consumer, filename)

    def close(self) -> None:
        self._shared.finish(self._consumer)
