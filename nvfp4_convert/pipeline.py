"""Executing a plan: source shards in, output shards out, with reading, compute and flushing overlapped.

One reader thread loads the next units (whole tensors, into pinned memory for GPU backends) while the
main thread quantizes and writes the current one; finished shards are flushed, hashed and recorded
by a committer thread while the next shard is produced. Memory stays within about twice the largest
tensor: units that would not fit are streamed in row chunks instead (two passes over the file).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import ConvertError
from .kernels import Backend
from .kernels.common import global_scale
from .output import OutputDir
from .plan import OutputShard, Plan, Unit
from .safetensors_io import ShardWriter, read_rows, read_tensor, read_tensor_bytes
from .sources import Source

CHUNK_BYTES = 32 * 1024 * 1024
_ONE = torch.tensor(1.0, dtype=torch.float32)


def unit_tensors(unit: Unit) -> list[str]:
    """The source tensors a unit reads."""
    return [unit.kept] if unit.kept else [f"{m}.weight" for m in unit.modules]


def run(*, source: Source, plan: Plan, output: OutputDir, shards: list[OutputShard], backend: Backend,
        progress: bool = True) -> None:
    """Produce ``shards`` (the plan's unfinished output shards) into ``output``."""
    steps = [(i, unit) for i, shard in enumerate(shards) for unit in shard.units]
    sizes = [sum(plan.tensors[t].info.nbytes for t in unit_tensors(u)) for _, u in steps]
    largest = max((t.info.nbytes for t in plan.tensors.values()), default=0)
    budget = max(2 * largest, 256 * 1024 * 1024)
    pinned = backend.device == "cuda" and torch.cuda.is_available()

    # Source shards are held from the first unit that reads them to the last one, so the disk holds
    # only what the units in flight need plus one prefetched shard.
    need_order: list[str] = []
    last_use: dict[str, int] = {}
    for pos, (_, unit) in enumerate(steps):
        for s in sorted(unit.sources, key=plan.source_shards.index):
            if s not in last_use:
                need_order.append(s)
            last_use[s] = pos

    acquired: dict[str, Path] = {}
    pending: deque[tuple[int, Future]] = deque()
    in_flight = 0
    next_pos = 0
    reader = ThreadPoolExecutor(1, thread_name_prefix="nvfp4-read")
    committer = ThreadPoolExecutor(1, thread_name_prefix="nvfp4-commit")
    commits: list[Future] = []
    writer: ShardWriter | None = None
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="converting", disable=not progress,
               dynamic_ncols=True)

    def submit_ahead(*, may_acquire: bool) -> None:
        nonlocal next_pos, in_flight
        while next_pos < len(steps):
            unit = steps[next_pos][1]
            # Read ahead within the memory budget, and only from shards already on disk unless the
            # unit is the very next one (the shards of finished units are released first).
            new_shards = not unit.sources <= acquired.keys()
            if pending and in_flight + sizes[next_pos] > budget or new_shards and (pending or not may_acquire):
                break
            for s in sorted(unit.sources, key=need_order.index):
                if s not in acquired:
                    acquired[s] = source.acquire(s)
            paths = {s: acquired[s] for s in unit.sources}
            whole = sizes[next_pos] <= budget
            pending.append((next_pos, reader.submit(_load, unit, plan, paths, whole, pinned)))
            in_flight += sizes[next_pos]
            next_pos += 1
        upcoming = next((s for s in need_order if s not in acquired and last_use[s] >= next_pos), None)
        if upcoming:
            source.prefetch(upcoming)

    try:
        for pos, (i, unit) in enumerate(steps):
            if writer is None:
                writer = ShardWriter(output.path / shards[i].filename, shards[i].tensors)
            submit_ahead(may_acquire=True)
            _, future = pending.popleft()
            loaded = future.result()
            submit_ahead(may_acquire=False)  # keep the reader busy while this unit is computed
            _process(unit, plan, loaded, {s: acquired[s] for s in unit.sources}, writer, backend)
            in_flight -= sizes[pos]
            bar.update(sizes[pos])
            for s in [s for s in acquired if last_use[s] <= pos]:
                source.release(s)
                del acquired[s]
            if pos + 1 == len(steps) or steps[pos + 1][0] != i:
                commits.append(committer.submit(_commit, writer, output, shards[i].filename))
                writer = None
                for done in [c for c in commits if c.done()]:
                    done.result()
        for c in commits:
            c.result()
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        committer.shutdown(wait=True)
        if writer is not None:
            writer.abort()
        bar.close()


def _commit(writer: ShardWriter, output: OutputDir, filename: str) -> None:
    writer.commit()
    output.record(filename)


def _load(unit: Unit, plan: Plan, paths: dict[str, Path], whole: bool, pinned: bool) -> dict[str, torch.Tensor] | None:
    """Read a unit's tensors into memory (or nothing, if it is to be streamed in chunks)."""
    if not whole:
        return None
    loaded = {}
    for name in unit_tensors(unit):
        t = plan.tensors[name]
        loaded[name] = read_tensor(paths[t.shard], plan.headers[t.shard], name, pin_memory=pinned and not unit.kept)
    return loaded


def _chunks(name: str, plan: Plan, paths: dict[str, Path], loaded: dict | None) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first_row, rows)`` chunks of a 2-D weight, from memory or streamed from its shard."""
    t = plan.tensors[name]
    rows = t.info.shape[0]
    step = max(1, CHUNK_BYTES // max(t.info.nbytes // max(rows, 1), 1))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        if loaded is not None:
            yield start, loaded[name][start:stop]
        else:
            yield start, read_rows(paths[t.shard], plan.headers[t.shard], name, start, stop)


def _process(unit: Unit, plan: Plan, loaded: dict | None, paths: dict[str, Path], writer: ShardWriter,
             backend: Backend) -> None:
    if unit.kept:
        if loaded is not None:
            writer.write(unit.kept, loaded[unit.kept])
            return
        t = plan.tensors[unit.kept]
        for start in range(0, t.info.nbytes, CHUNK_BYTES):
            stop = min(t.info.nbytes, start + CHUNK_BYTES)
            writer.write(unit.kept, read_tensor_bytes(paths[t.shard], plan.headers[t.shard], unit.kept, start, stop),
                         at=start)
        return
    group_amax = torch.tensor(0.0)
    for module in unit.modules:
        name = f"{module}.weight"
        amax = torch.tensor(0.0)
        for _, w in _chunks(name, plan, paths, loaded):
            amax = torch.maximum(amax, backend.amax(w).cpu())
        if not torch.isfinite(amax):
            raise ConvertError(f"tensor {name} contains NaN or Inf", where=plan.tensors[name].shard,
                               fix="Fix the source weights, or --exclude this module to keep it unquantized")
        group_amax = torch.maximum(group_amax, amax)
    ws2 = global_scale(group_amax)
    for module in unit.modules:
        k = plan.quantized[module].info.shape[1]
        for start, w in _chunks(f"{module}.weight", plan, paths, loaded):
            packed, scales = backend.quantize(w, ws2)
            writer.write(f"{module}.weight", packed, at=start * (k // 2))
            writer.write(f"{module}.weight_scale", scales, at=start * (k // 16))
        writer.write(f"{module}.weight_scale_2", ws2.reshape(()))
        if not plan.weight_only:
            writer.write(f"{module}.input_scale", _ONE)
