"""Executing a plan: source shards in, output shards out, with reading, compute and writing overlapped.

Source tensors are memory-mapped, not copied. A reader thread maps and faults in the next units (for
GPU backends, copies their weights to the device on a stream of its own) and takes each weight's amax,
while the main thread quantizes the current one; a writer thread writes (and hashes) the results, then
renames and records each finished shard. Memory stays within about twice the largest
tensor: a unit that would not fit is mapped one tensor at a time and faulted in as it is computed.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import ConvertError
from .fp8 import check_scale_values, dequantize
from .importance import ChannelWeights
from .kernels import Backend, reference, search
from .kernels.common import global_scale, is_dust
from .output import OutputDir
from .plan import OutputShard, Plan, Unit
from .safetensors_io import ShardWriter, map_tensor
from .sources import Source

CHUNK_BYTES = 32 * 1024 * 1024
GPU_CHUNK_BYTES = 1024 * 1024 * 1024
WRITE_QUEUE_BYTES = 256 * 1024 * 1024  # results waiting for the writer thread
BUDGET_LARGEST, MIN_BUDGET_BYTES = 2, 256 * 1024 * 1024  # read-ahead: 2x the largest tensor, at least 256 MiB
_ONE = torch.tensor(1.0, dtype=torch.float32)


def unit_tensors(unit: Unit) -> list[str]:
    """The source tensors a unit produces its outputs from (FP8 scales aside: see ``Plan.reads``)."""
    if unit.kept or unit.stacked:
        return [unit.kept or unit.stacked]
    return [f"{m}.weight" for m in unit.modules]


def unit_bytes(unit: Unit, plan: Plan) -> int:
    """Memory a unit holds while in flight: its source bytes, and the BF16 dequantization of FP8 weights."""
    total = 0
    for name in unit_tensors(unit):
        total += sum(plan.tensors[r].info.nbytes for r in plan.reads(name))
        if name in plan.fp8:
            total += 2 * plan.tensors[name].info.nbytes
    return total


def shards_read(plan: Plan, shards: list[OutputShard], weights: ChannelWeights | None = None) -> set[str]:
    """The source shards producing ``shards`` reads (``weights``: the weighted search's channel weights)."""
    return {s for shard in shards for unit in shard.units for s in _sources(unit, plan, weights)}


def run(*, source: Source, plan: Plan, output: OutputDir, shards: list[OutputShard], backend: Backend,
        progress: bool = True, input_scales: Mapping[str, torch.Tensor] | None = None, scales: str = "rtn",
        channel_weights: ChannelWeights | None = None) -> None:
    """Produce ``shards`` (the plan's unfinished output shards) into ``output``.

    ``input_scales`` are calibrated per-module values (only ``get`` is used, when the module is computed); without
    them every ``input_scale`` is 1.0.

    With ``scales`` ``"mse"`` or ``"mse-weighted"`` block scales come from ``backend.search``; the weighted
    search asks ``channel_weights`` for each module's weights. Those may read other source tensors (a
    layer's norms, its v/gate/up for o/down): their shards are held as the unit's own, and units within
    each output shard run in ``channel_weights.order`` (a layer's readers after what they read).
    """
    weighted = channel_weights if scales == "mse-weighted" else None
    steps = _steps(shards, weighted)
    unit_sources = [_sources(u, plan, weighted) for _, u in steps]
    sizes = [unit_bytes(u, plan) for _, u in steps]
    largest = max((t.info.nbytes for t in plan.tensors.values()), default=0)
    ahead = _ReadAhead(source=source, plan=plan, units=[u for _, u in steps], sources=unit_sources, sizes=sizes,
                       budget=max(BUDGET_LARGEST * largest, MIN_BUDGET_BYTES), backend=backend)
    writes = _Writes(limit=WRITE_QUEUE_BYTES)
    writer: ShardWriter | None = None
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="converting", disable=not progress,
               dynamic_ncols=True)
    read: set[str] = set()  # source shards the current output shard is made from
    try:
        for pos, (i, unit) in enumerate(steps):
            if writer is None:
                writer = ShardWriter(output.path / shards[i].filename, shards[i].tensors)
            ahead.fill(may_acquire=True)
            loaded = ahead.take(pos)
            ahead.fill(may_acquire=False)  # keep the reader busy while this unit is computed
            _process(unit, plan, loaded, ahead.paths(pos), writer, writes, backend, input_scales or {}, scales,
                     weighted)
            del loaded
            ahead.done(pos)
            bar.update(sizes[pos])
            read |= unit_sources[pos]
            if pos + 1 == len(steps) or steps[pos + 1][0] != i:
                for s in sorted(read):  # an output shard is recorded only once its sources' data checked out
                    source.check(s)
                read.clear()
                finished, writer = writer, None
                writes.submit(_commit, finished, output, shards[i].filename, nbytes=0)
            writes.check()
            if releasable := ahead.releasable(pos):
                writes.drain()  # the source bytes of kept tensors may still be queued for writing
                ahead.release(releasable)
        writes.drain()
    except Exception:
        for s in ahead.ever_acquired:  # a corrupt download explains a bad tensor better than the tensor does
            source.check(s)
        raise
    finally:
        ahead.close()
        writes.close()
        if writer is not None:
            writer.abort()
        bar.close()


class _ReadAhead:
    """The reader thread's schedule: which units are loaded ahead, and which source shards are held.

    Units are loaded in order. The next one is admitted when both hold:

    * memory: nothing is loaded ahead yet, or the bytes loaded ahead plus its own stay within ``budget``;
    * disk: every source shard it reads is already acquired, or acquiring is allowed (``may_acquire``:
      the main thread is about to wait for it) and nothing else is loaded ahead.

    A source shard is acquired by the first unit that reads it and released after the last one, so the disk
    holds what the units in flight read plus the one shard :meth:`fill` asks the source to prefetch.
    """

    def __init__(self, *, source: Source, plan: Plan, units: list[Unit], sources: list[frozenset[str]],
                 sizes: list[int], budget: int, backend: Backend):
        self.source, self.plan, self.units, self.sources, self.sizes = source, plan, units, sources, sizes
        self.budget, self.backend = budget, backend
        self.device = "cuda" if backend.device == "cuda" else None
        self.need_order: list[str] = []  # source shards in the order units first read them
        self.last_use: dict[str, int] = {}  # source shard -> position of the last unit reading it
        for pos, shards in enumerate(sources):
            for s in sorted(shards, key=plan.source_shards.index):
                if s not in self.last_use:
                    self.need_order.append(s)
                self.last_use[s] = pos
        self.acquired: dict[str, Path] = {}
        self.ever_acquired: list[str] = []
        self.pending: deque[tuple[int, Future]] = deque()  # (position, load) of the units loaded ahead
        self.in_flight = 0  # bytes of the units submitted and not yet done
        self.next_pos = 0  # the next unit to submit
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="nvfp4-read")

    def _admits(self, pos: int, *, may_acquire: bool) -> bool:
        over_budget = bool(self.pending) and self.in_flight + self.sizes[pos] > self.budget
        new_shards = not self.sources[pos] <= self.acquired.keys()
        return not over_budget and not (new_shards and (self.pending or not may_acquire))

    def fill(self, *, may_acquire: bool) -> None:
        """Submit the units the admission rule allows, then prefetch the next shard not yet acquired."""
        while self.next_pos < len(self.units) and self._admits(self.next_pos, may_acquire=may_acquire):
            pos = self.next_pos
            for s in sorted(self.sources[pos], key=self.need_order.index):
                if s not in self.acquired:  # its data check runs on while the next shard downloads
                    self.acquired[s] = self.source.acquire(s, checked=False)
                    self.ever_acquired.append(s)
            whole = self.sizes[pos] <= self.budget
            self.pending.append((pos, self.reader.submit(_load, self.units[pos], self.plan, self.paths(pos), whole,
                                                         self.device, self.backend)))
            self.in_flight += self.sizes[pos]
            self.next_pos += 1
        upcoming = next((s for s in self.need_order if s not in self.acquired and self.last_use[s] >= self.next_pos),
                        None)
        if upcoming:
            self.source.prefetch(upcoming)

    def take(self, pos: int) -> _Loaded | None:
        """Wait for unit ``pos`` (the oldest one loaded ahead) and return what was loaded."""
        submitted, future = self.pending.popleft()
        assert submitted == pos, (submitted, pos)
        return future.result()

    def paths(self, pos: int) -> dict[str, Path]:
        return {s: self.acquired[s] for s in self.sources[pos]}

    def done(self, pos: int) -> None:
        self.in_flight -= self.sizes[pos]

    def releasable(self, pos: int) -> list[str]:
        """Acquired shards no unit after ``pos`` reads."""
        return [s for s in self.acquired if self.last_use[s] <= pos]

    def release(self, shards: list[str]) -> None:
        for s in shards:
            self.source.release(s)
            del self.acquired[s]

    def close(self) -> None:
        self.reader.shutdown(wait=True, cancel_futures=True)


class _Writes:
    """A writer thread with back-pressure: at most ``limit`` bytes wait to be written."""

    def __init__(self, *, limit: int):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="nvfp4-write")
        self.queue: deque[tuple[Future, int]] = deque()
        self.limit, self.waiting = limit, 0

    def submit(self, fn, *args, nbytes: int) -> None:
        while self.queue and self.waiting + nbytes > self.limit:
            self._pop()
        self.queue.append((self.pool.submit(fn, *args), nbytes))
        self.waiting += nbytes

    def _pop(self) -> None:
        future, nbytes = self.queue.popleft()
        self.waiting -= nbytes
        future.result()

    def check(self) -> None:
        while self.queue and self.queue[0][0].done():
            self._pop()

    def drain(self) -> None:
        while self.queue:
            self._pop()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _commit(writer: ShardWriter, output: OutputDir, filename: str) -> None:
    writer.commit()  # all its writes came before, on this same thread
    output.record(filename, writer.digest())


@dataclass
class _Loaded:
    """A unit's tensors read ahead, by name, and the max|W| of each weight to quantize."""

    tensors: dict[str, torch.Tensor]
    amax: dict[str, torch.Tensor] = field(default_factory=dict)


def _load(unit: Unit, plan: Plan, paths: dict[str, Path], whole: bool, device: str | None,
          backend: Backend) -> _Loaded | None:
    """Map a unit's tensors and fault them in (or nothing, if the unit is too large to hold at once).

    With a ``device``, the weights to quantize are copied there instead, on the reader's own stream.
    Each weight's amax is computed here too, off the main thread, while the previous unit quantizes.
    """
    if not whole:
        return None
    names = unit_tensors(unit)
    loaded = _Loaded({name: _map(name, plan, paths) for name in names})
    if unit.kept and unit.kept not in plan.fp8:
        return loaded
    stream = torch.cuda.Stream() if device else None
    with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
        for name in names:
            t = loaded.tensors[name]
            if device:
                t = t.to(device, non_blocking=False)
            if name in plan.fp8:  # dequantized here, where the copy to a device is still FP8-sized
                out = torch.empty(t.shape, dtype=torch.bfloat16, device=t.device)
                for start, rows in _rows(name, plan, paths, None, weight=t):
                    out[start : start + len(rows)] = rows
                t = out.cpu() if unit.kept else out  # a kept tensor goes to the writer
            loaded.tensors[name] = t
            if not unit.kept:
                loaded.amax[name] = _amax(t, backend).cpu()
    if stream:
        stream.synchronize()
    return loaded


def _amax(weight: torch.Tensor | Iterator[tuple[int, torch.Tensor]], backend: Backend) -> torch.Tensor:
    """max|weight| in row chunks (float32 0-dim on the weight's device)."""
    amax = None
    for _, w in _chunks(weight) if isinstance(weight, torch.Tensor) else weight:
        part = backend.amax(w if w.dim() == 2 else w.reshape(-1, w.shape[-1]))
        amax = part if amax is None else torch.maximum(amax, part)
    return amax if amax is not None else torch.tensor(0.0)


def _map(name: str, plan: Plan, paths: dict[str, Path]) -> torch.Tensor:
    t = plan.tensors[name]
    return map_tensor(paths[t.shard], plan.headers[t.shard], name)


def _rows(name: str, plan: Plan, paths: dict[str, Path], loaded: _Loaded | None,
          weight: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first_row, rows)`` chunks of source weight ``name`` as it is quantized: FP8 ones dequantized."""
    if loaded is not None:
        yield from _chunks(loaded.tensors[name])
        return
    weight = _map(name, plan, paths) if weight is None else weight
    if name not in plan.fp8:
        yield from _chunks(weight)
        return
    spec = plan.fp8[name]
    scale = _map(spec.scale, plan, paths)
    check_scale_values(scale, spec.scale, where=plan.tensors[spec.scale].shard)
    scale = scale.to(weight.device)
    for start, rows in _chunks(weight):
        yield start, dequantize(rows, scale, spec.block, row_start=start)


def _chunks(weight: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first_row, rows)`` chunks of a 2-D weight, so host temporaries stay small (GPU ones need not)."""
    rows = weight.shape[0]
    limit = GPU_CHUNK_BYTES if weight.is_cuda else CHUNK_BYTES
    step = max(1, limit // max(weight[:1].numel() * weight.element_size(), 1))
    for start in range(0, rows, step):
        yield start, weight[start : start + step]


def first_source_shard(*, plan: Plan, shards: list[OutputShard], scales: str = "rtn",
                       channel_weights: ChannelWeights | None = None) -> str | None:
    """The source shard :func:`run` acquires first for these arguments (a source may start fetching it early)."""
    weighted = channel_weights if scales == "mse-weighted" else None
    steps = _steps(shards, weighted)
    return min(_sources(steps[0][1], plan, weighted), key=plan.source_shards.index, default=None) if steps else None


def _steps(shards: list[OutputShard], weighted: ChannelWeights | None) -> list[tuple[int, Unit]]:
    """(output shard index, unit) in the order units run: shard by shard, by layer within one if weighted."""
    return [(i, unit) for i, shard in enumerate(shards)
            for unit in (sorted(shard.units, key=lambda u: _order(u, weighted)) if weighted else shard.units)]


def _order(unit: Unit, weights: ChannelWeights) -> tuple:
    return max((weights.order(m) for m in unit.modules), default=())


def _sources(unit: Unit, plan: Plan, weights: ChannelWeights | None) -> frozenset[str]:
    """The source shards a unit needs: its own, and those of the tensors its channel weights read."""
    if weights is None:
        return unit.sources
    extra = {plan.tensors[r].shard for m in unit.modules for t in weights.needs(m) for r in plan.reads(t)}
    return unit.sources | extra


def _process(unit: Unit, plan: Plan, loaded: _Loaded | None, paths: dict[str, Path], writer: ShardWriter,
             writes: _Writes, backend: Backend, input_scales: dict[str, torch.Tensor], scales: str = "rtn",
             weighted: ChannelWeights | None = None) -> None:
    if unit.kept:
        if loaded is not None or unit.kept not in plan.fp8:
            data = loaded.tensors[unit.kept] if loaded is not None else _map(unit.kept, plan, paths)
            writes.submit(writer.write, unit.kept, data, nbytes=data.numel() * data.element_size())
            return
        for start, rows in _rows(unit.kept, plan, paths, None):  # an FP8 tensor too large to hold dequantized
            at = start * rows[:1].numel() * rows.element_size()
            writes.submit(writer.write, unit.kept, rows, at, nbytes=rows.numel() * rows.element_size())
        return
    if unit.stacked:
        return _process_stacked(unit.stacked, plan, loaded, paths, writer, writes, backend, scales)
    group_amax = torch.tensor(0.0)
    for module in unit.modules:
        name = f"{module}.weight"
        amax = loaded.amax[name] if loaded is not None else _amax(_rows(name, plan, paths, None), backend).cpu()
        _check_finite(name, amax, plan)
        group_amax = torch.maximum(group_amax, amax)
    ws2, quantize, searched = _group_kernels(group_amax, backend)
    for module in unit.modules:
        k = plan.tensors[f"{module}.weight"].info.shape[1]
        h = None
        if weighted is not None:
            h = weighted.weights(module, lambda name: _rows(name, plan, paths, None))
        for start, w in _rows(f"{module}.weight", plan, paths, loaded):
            if scales == "rtn":
                packed, block_scales = quantize(w, ws2)
            else:
                packed, block_scales = searched(w, group_amax, h)
            writes.submit(writer.write, f"{module}.weight", packed, start * (k // 2), nbytes=packed.numel())
            writes.submit(writer.write, f"{module}.weight_scale", block_scales, start * (k // 16),
                          nbytes=block_scales.numel())
        writes.submit(writer.write, f"{module}.weight_scale_2", ws2, nbytes=4)
        if not plan.weight_only:
            writes.submit(writer.write, f"{module}.input_scale", input_scales.get(module, _ONE), nbytes=4)


def _process_stacked(name: str, plan: Plan, loaded: _Loaded | None, paths: dict[str, Path], writer: ShardWriter,
                     writes: _Writes, backend: Backend, scales: str = "rtn") -> None:
    """A fused ``[E, in, out]`` expert tensor: one global scale for all of it, each expert's transpose
    quantized along ``in`` and written back transposed (see :mod:`.stacked`). ``mse-weighted`` has no
    proxy for these and searches them unweighted."""
    stacked = loaded.tensors[name] if loaded is not None else _map(name, plan, paths)
    amax = loaded.amax[name] if loaded is not None else _amax(stacked, backend).cpu()
    _check_finite(name, amax, plan)
    ws2, quantize, searched = _group_kernels(amax, backend)
    experts, k, n = stacked.shape
    for e in range(experts):
        rows = stacked[e].t().contiguous()
        packed, block = quantize(rows, ws2) if scales == "rtn" else searched(rows, amax, None)
        packed, block = packed.t().contiguous(), block.t().contiguous()
        writes.submit(writer.write, name, packed, e * packed.numel(), nbytes=packed.numel())
        writes.submit(writer.write, f"{name}_weight_scale", block, e * block.numel(), nbytes=block.numel())
    writes.submit(writer.write, f"{name}_weight_scale_2", ws2, nbytes=4)
    if not plan.weight_only:
        writes.submit(writer.write, f"{name}_input_scale", _ONE, nbytes=4)


def _check_finite(name: str, amax: torch.Tensor, plan: Plan) -> None:
    if not torch.isfinite(amax):
        raise ConvertError(f"tensor {name} contains NaN or Inf", where=plan.tensors[name].shard,
                           fix="Fix the source weights, or --exclude this module to keep it unquantized")


def _group_kernels(group_amax: torch.Tensor, backend: Backend) -> tuple[torch.Tensor, Callable, Callable]:
    """A fused group's ``weight_scale_2`` and the round-to-nearest and search functions that quantize it
    (denormal dust goes to the reference on every backend)."""
    ws2 = global_scale(group_amax).reshape(())
    if is_dust(group_amax):
        return ws2, _quantize_dust, search.quantize
    return ws2, backend.quantize, backend.search or search.quantize


def _quantize_dust(weight: torch.Tensor, ws2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Denormal dust goes through the reference on the CPU, whatever the backend: its divisors are
    subnormal, where reciprocal-based and flush-to-zero arithmetic differ, so this is what gives the
    same bytes on every backend."""
    return reference.quantize(weight.cpu(), ws2.cpu())
