"""Quantize throughput of every backend on this machine, against the reference measured in the same run.

Each timed call is what the converter does for one weight: ``ws2 = global_scale(amax(W))`` then
``quantize(W, ws2)``. Throughput is reported in GB/s of *input* (``R * K * itemsize``).

CPU: wall-clock median of ``repeats`` calls after one untimed warm-up call (which includes any JIT
compilation; its time is reported as ``first_call_s``). The reference is slow, so it is timed on at most
two calls, with no warm-up, and not at all above ``REFERENCE_MAX_ELEMENTS`` elements; its throughput
hardly depends on the shape, so larger shapes state the ratio against the largest shape it did run,
labelled as such.

CUDA: inputs live on the GPU, in enough rotating buffers that each call reads a weight that is not in L2.
The calls of the device entry point (outputs stay on the GPU) are captured in one CUDA graph, whose
replays are timed with ``torch.cuda.Event`` pairs, so that launch overhead does not count; a backend
that cannot be captured is timed call by call with events instead (said in the note). The median is
reported. The baseline is the reference run on the GPU. "of copy" relates bytes per second to a
device-to-device copy's (bytes read + written), counting the weight once plus the codes and scales;
"(moved)" also counts the amax pass's read of the weight. ``sweep=True`` covers every ``M x K`` of
:data:`SWEEP_ROWS` x :data:`SWEEP_COLS`.

Run ``nvfp4-convert bench --help``.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import kernels
from .constants import BLOCK
from .errors import ConvertError, require_module
from .kernels import cpu as cpu_kernels
from .kernels import reference
from .kernels.common import global_scale

DEFAULT_SHAPES: list[tuple[int, int]] = [(2048, 2048), (4096, 4096), (8192, 8192)]
SWEEP_ROWS = (1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768)
SWEEP_COLS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
REFERENCE_MAX_ELEMENTS = 8192 * 8192  # CPU only: a few seconds per reference call on 2 cores
REFERENCE_REPEATS = 2
_CUDA_ROTATION_BYTES_CAP = 4 << 30  # rotating input buffers never take more GPU memory than this

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
FIELDS = ["backend", "device", "dtype", "rows", "cols", "repeats", "median_s", "min_s", "gbps",
          "speedup_vs_reference", "reference_basis", "first_call_s", "exact", "timing", "of_copy_bandwidth",
          "of_copy_bandwidth_moved", "note"]


def _dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ConvertError(f"unknown dtype {name!r}", where="--dtype", fix="Use bfloat16, float16 or float32") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _make_weight(rows: int, cols: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    """A weight-like tensor: normal values with a spread of row magnitudes (deterministic)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, device=device)
    w *= 0.02 * torch.exp2(torch.randn(rows, 1, generator=gen, device=device))
    return w.to(dtype)


def _step(amax: Callable, quantize: Callable) -> Callable[[torch.Tensor], object]:
    return lambda w: quantize(w, global_scale(amax(w)))


def _time_cpu(step: Callable, w: torch.Tensor, repeats: int, warm_up: bool) -> tuple[list[float], float | None]:
    first = None
    if warm_up:
        start = time.perf_counter()
        step(w)
        first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(w)
        times.append(time.perf_counter() - start)
    return times, first


def _cuda_inputs(rows: int, cols: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Enough copies of the input that cycling through them keeps each call's weight out of L2."""
    one = _make_weight(rows, cols, dtype, "cuda", seed)
    nbytes = one.numel() * one.element_size()
    l2 = getattr(torch.cuda.get_device_properties(one.device), "L2_cache_size", 64 << 20)
    count = max(2, math.ceil(2 * l2 / max(nbytes, 1)) + 1)
    count = max(2, min(count, 64, _CUDA_ROTATION_BYTES_CAP // max(nbytes, 1)))
    return [one] + [one.clone() for _ in range(count - 1)]


def _time_cuda(step: Callable, inputs: list[torch.Tensor], repeats: int, warm_up: bool, *,
               graph: bool) -> tuple[list[float], float | None, str]:
    """Per-call seconds of ``step`` on rotating inputs: CUDA-graph replays if ``graph`` (the step must be
    capturable: no host sync), so that launch overhead does not count; else CUDA events around each call."""
    first = None
    if warm_up:
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(inputs[0])
        torch.cuda.synchronize()
        first = time.perf_counter() - start
    if graph:
        return _time_cuda_graph(step, inputs, repeats), first, "cuda-graph"
    times = []
    for i in range(repeats):
        w = inputs[(i + 1) % len(inputs)]
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        step(w)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return times, first, "events"


def _time_cuda_graph(step: Callable, inputs: list[torch.Tensor], repeats: int) -> list[float]:
    calls = max(len(inputs), 4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture wants one call on a side stream first
        step(inputs[0])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            step(inputs[i % len(inputs)])
    graph.replay()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3 / calls)
    del graph
    return times


def _cuda_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes read + written per second by a device-to-device copy: the better of ``copy_`` timed with
    events and a copy kernel replayed from a CUDA graph (medians of 10)."""
    src = [torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(2)]
    dst = torch.empty_like(src[0])
    events, _, _ = _time_cuda(lambda x: dst.copy_(x), src, 10, warm_up=True, graph=False)
    graphed = _time_cuda_graph(lambda x: torch.add(x, 0, out=dst), src, 10)
    return 2 * nbytes / min(statistics.median(events), statistics.median(graphed))


def _measure(base: dict, inputs: list[torch.Tensor], name: str, amax: Callable, quantize: Callable, repeats: int,
             *, warm_up: bool, exact: bool, graph: bool = False, note: str = "") -> dict:
    step = _step(amax, quantize)
    timing = "wall clock"
    if base["device"] == "cpu":
        times, first = _time_cpu(step, inputs[0], repeats, warm_up)
    else:
        times, first, timing = _time_cuda(step, inputs, repeats, warm_up, graph=graph)
    median = statistics.median(times)
    nbytes = inputs[0].numel() * inputs[0].element_size()
    return {**base, "backend": name, "repeats": repeats, "median_s": median, "min_s": min(times),
            "gbps": nbytes / median / 1e9, "first_call_s": first, "exact": exact, "timing": timing, "note": note}


def _add_speedups(results: list[dict]) -> None:
    """Speedup against the reference at the same shape, or else at the largest shape it ran."""
    measured = {(r["rows"], r["cols"]): r["gbps"] for r in results if r["backend"] == "reference" and "gbps" in r}
    if not measured:
        return
    largest = max(measured, key=lambda shape: shape[0] * shape[1])
    for r in results:
        if "gbps" not in r:
            continue
        shape = (r["rows"], r["cols"])
        basis = shape if shape in measured else largest
        r["speedup_vs_reference"] = r["gbps"] / measured[basis]
        r["reference_basis"] = "measured" if basis == shape else f"reference GB/s at {basis[0]}x{basis[1]}"


def _fmt_ratio(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:,.1f}x"


def _check_args(device: str, backends: list[str] | None, shapes: list[tuple[int, int]] | None, dtype: str,
                repeats: int) -> tuple[torch.dtype, list[tuple[int, int]], list[kernels.Backend]]:
    """The dtype, shapes and backends (default: every one for ``device`` but the reference) to time."""
    if device not in ("cpu", "cuda"):
        raise ConvertError(f"unknown device {device!r}", where="--device", fix="Use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConvertError("torch sees no CUDA GPU here", where="--device cuda",
                           fix="Run on a GPU machine, or use --device cpu")
    torch_dtype = _dtype(dtype)
    shapes = list(shapes or DEFAULT_SHAPES)
    for rows, cols in shapes:
        if rows < 1 or cols < 16 or cols % 16:
            raise ConvertError(f"cannot time shape {rows}x{cols}", where="--shape",
                               fix=f"Use ROWSxCOLS with ROWS >= 1 and COLS a positive multiple of {BLOCK}")
    if repeats < 1:
        raise ConvertError(f"cannot time {repeats} calls", where="--repeats", fix="Give 1 or more")
    names = backends or [b.name for b in sorted(kernels.backends().values(), key=lambda b: -b.priority)
                         if b.device == device and b.name != "reference"]
    unknown = sorted(set(names) - set(kernels.backends()))
    if unknown:
        raise ConvertError(f"unknown backend {unknown[0]!r}", where="--backend",
                           fix=f"Use one of {', '.join(sorted(kernels.backends()))}")
    return torch_dtype, shapes, [kernels.get_backend(n) for n in names if n != "reference"]


def run_bench(
    *,
    device: str = "cpu",
    backends: list[str] | None = None,
    shapes: list[tuple[int, int]] | None = None,
    dtype: str = "bfloat16",
    repeats: int = 5,
    sweep: bool = False,
    csv_path: Path | None = None,
    plot_path: Path | None = None,
    out: Callable[[str], object] = print,
) -> list[dict]:
    """Time ``amax`` + ``quantize`` of each backend on ``device`` for each ``[R, K]`` shape.

    Args:
        device: ``"cpu"`` or ``"cuda"``: which backends run, and where the inputs live.
        backends: names to time (default: every backend registered for ``device``); the reference is
            always timed too, as the baseline of the speedup column.
        shapes: ``(R, K)`` pairs, K a multiple of 16 (default :data:`DEFAULT_SHAPES`).
        dtype: input dtype, ``bfloat16``, ``float16`` or ``float32``.
        repeats: timed calls per backend and shape (the median is reported).
        sweep: time every shape of :data:`SWEEP_ROWS` x :data:`SWEEP_COLS` instead of ``shapes``.
        csv_path: also write the rows there as CSV.
        plot_path: also draw the speedups to this PNG (needs matplotlib).
        out: where the table's lines go.

    Returns:
        One dict per (backend, shape) with the keys in :data:`FIELDS`.
    """
    if plot_path is not None:
        require_module("matplotlib", purpose="plots", where="--plot", extra="plot")
    shapes = [(m, k) for k in SWEEP_COLS for m in SWEEP_ROWS] if sweep else shapes
    torch_dtype, shapes, chosen = _check_args(device, backends, shapes, dtype, repeats)

    if device == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        where = (f"cpu: {cores} usable cores, torch threads {torch.get_num_threads()}, "
                 f"cpu backend threads {cpu_kernels.threads()}")
    else:
        copy_bw = _cuda_copy_bandwidth()
        where = f"cuda: {torch.cuda.get_device_name()}, device-to-device copy {copy_bw / 1e12:.2f} TB/s"
    out(f"nvfp4 quantize benchmark: {where}; dtype {_dtype_name(torch_dtype)}; amax + quantize per call; "
        f"median of {repeats} (reference: {REFERENCE_REPEATS if device == 'cpu' else repeats})")
    for backend in [kernels.get_backend("reference"), *chosen]:
        out(f"  {backend.name}: {backend.description}")

    results: list[dict] = []
    for seed, (rows, cols) in enumerate(shapes):
        base = {"device": device, "dtype": _dtype_name(torch_dtype), "rows": rows, "cols": cols}
        if device == "cpu":
            inputs = [_make_weight(rows, cols, torch_dtype, "cpu", seed)]
        else:
            inputs = _cuda_inputs(rows, cols, torch_dtype, seed)
        # the baseline first: the reference (on the GPU for device="cuda")
        if device == "cuda" or rows * cols <= REFERENCE_MAX_ELEMENTS:
            reps = min(repeats, REFERENCE_REPEATS) if device == "cpu" else repeats
            note = "pure torch" + (" on cuda" if device == "cuda" else "")
            row = _measure(base, inputs, "reference", reference.amax, reference.quantize, reps,
                           warm_up=device == "cuda", exact=True, note=note)
        else:
            row = {**base, "backend": "reference",
                   "note": f"not run above {REFERENCE_MAX_ELEMENTS:,} elements (too slow)"}
        results.append(row)
        for backend in chosen:
            if backend.device != device:
                results.append({**base, "backend": backend.name, "note": f"skipped: runs on {backend.device}"})
                continue
            why_not = backend.available()
            if why_not:
                results.append({**base, "backend": backend.name, "note": f"unavailable: {why_not}"})
                continue
            try:
                on_device = device == "cuda" and backend.quantize_device is not None  # no host sync: capturable
                quantize = backend.quantize_device if on_device else backend.quantize
                row = _measure(base, inputs, backend.name, backend.amax, quantize, repeats,
                               warm_up=True, exact=backend.exact, graph=on_device)
            except Exception as exc:  # one broken backend must not end the whole run
                row = {**base, "backend": backend.name, "note": f"failed: {type(exc).__name__}: {exc}"[:200]}
            results.append(row)
        del inputs
    _add_speedups(results)
    if device == "cuda":
        itemsize = torch.empty(0, dtype=torch_dtype).element_size()
        for r in results:  # bytes read + written per second, against a plain copy's
            if "median_s" in r:
                once = r["rows"] * r["cols"] * (itemsize + 0.5 + 1 / 16)  # the weight once, codes, scales
                r["of_copy_bandwidth"] = once / r["median_s"] / copy_bw
                # what the two passes move: the amax pass reads the weight as well
                r["of_copy_bandwidth_moved"] = (once + r["rows"] * r["cols"] * itemsize) / r["median_s"] / copy_bw

    _print_table(results, out)
    if any(r.get("reference_basis", "measured") != "measured" for r in results):
        out("(*) speedup against the reference's GB/s at the largest shape it ran, in this same run")
    if csv_path is not None:
        csv_path = Path(csv_path)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with csv_path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(results)
        out(f"wrote {csv_path}")
    if plot_path is not None:
        _plot(results, Path(plot_path))
        out(f"wrote {plot_path}")
    return results


def run_scales_bench(
    *,
    device: str = "cpu",
    backends: list[str] | None = None,
    shapes: list[tuple[int, int]] | None = None,
    dtype: str = "bfloat16",
    modes: list[str] | None = None,
    repeats: int = 5,
    out: Callable[[str], object] = print,
) -> list[dict]:
    """What the block-scale search costs against round-to-nearest, per backend and ``[R, K]`` shape.

    Each backend with a search is timed on the same inputs as ``amax`` + ``quantize`` (``rtn``) and as
    ``amax`` + ``search`` in each of ``modes`` (``mse``, ``mse-weighted`` with spread per-column weights),
    both with outputs on the CPU as the converter takes them; median of ``repeats`` calls after one untimed
    call. CUDA calls are timed with events on rotating inputs (the search reads the global amax on the host,
    so it cannot be captured in a graph). Prints one line per backend and shape; returns dicts with the
    medians (``rtn_s``, ``mse_s``, ...) and ratios (``mse_vs_rtn``, ...).
    """
    modes = list(modes or ("mse", "mse-weighted"))
    bad = sorted(set(modes) - {"mse", "mse-weighted"})
    if bad:
        raise ConvertError(f"unknown block-scale search mode {bad[0]!r}", where="--scales",
                           fix="Use mse or mse-weighted")
    torch_dtype, shapes, chosen = _check_args(device, backends, shapes, dtype, repeats)
    chosen = [b for b in chosen if b.device == device and b.search is not None and b.available() is None]
    if not chosen:
        raise ConvertError(f"no backend with a block-scale search can run on {device} here", where="--backend",
                           fix="Run `nvfp4-convert bench` to list backends")
    out(f"block-scale search cost on {device}; dtype {_dtype_name(torch_dtype)}; amax + quantize or search per "
        f"call; median of {repeats}")
    header = f"{'backend':<10} {'shape':>11} {'rtn ms':>10}" + "".join(f" {m + ' ms':>17} {'x rtn':>7}" for m in modes)
    out(header)
    out("-" * len(header))
    results = []
    for seed, (rows, cols) in enumerate(shapes):
        inputs = (_cuda_inputs(rows, cols, torch_dtype, seed) if device == "cuda"
                  else [_make_weight(rows, cols, torch_dtype, "cpu", seed)])
        gen = torch.Generator().manual_seed(seed)
        h = torch.exp(2 * torch.randn(cols, generator=gen)).to(inputs[0].device)
        for backend in chosen:
            steps = {"rtn": _step(backend.amax, backend.quantize)}
            for m in modes:
                weights = h if m == "mse-weighted" else None
                steps[m] = lambda w, weights=weights, b=backend: b.search(w, b.amax(w), weights)
            row = {"backend": backend.name, "device": device, "dtype": _dtype_name(torch_dtype), "rows": rows,
                   "cols": cols}
            for name, step in steps.items():
                if device == "cuda":
                    times, _, _ = _time_cuda(step, inputs, repeats, True, graph=False)
                else:
                    times, _ = _time_cpu(step, inputs[0], repeats, True)
                row[f"{name}_s"] = statistics.median(times)
            for m in modes:
                row[f"{m}_vs_rtn"] = row[f"{m}_s"] / row["rtn_s"]
            results.append(row)
            out(f"{backend.name:<10} {f'{rows}x{cols}':>11} {row['rtn_s'] * 1e3:>10.3f}"
                + "".join(f" {row[f'{m}_s'] * 1e3:>17.3f} {row[f'{m}_vs_rtn']:>6.1f}x" for m in modes))
        del inputs
    return results


def _plot(results: list[dict], path: Path) -> None:
    """Speedup over the reference against rows M, one line per K, one panel per backend."""
    from matplotlib.figure import Figure
    names = sorted({r["backend"] for r in results if r["backend"] != "reference" and "speedup_vs_reference" in r})
    fig = Figure(figsize=(6 * max(len(names), 1), 4.5), layout="constrained")
    for ax, name in zip(fig.subplots(1, max(len(names), 1), squeeze=False)[0], names):
        rows = [r for r in results if r["backend"] == name and "speedup_vs_reference" in r]
        for k in sorted({r["cols"] for r in rows}):
            line = sorted((r["rows"], r["speedup_vs_reference"]) for r in rows if r["cols"] == k)
            ax.plot(*zip(*line), marker="o", label=f"K={k}")
        ax.set(xscale="log", yscale="log", xlabel="rows M", ylabel="speedup vs reference", title=name)
        ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _print_table(results: list[dict], out: Callable[[str], object]) -> None:
    header = (f"{'backend':<22} {'shape':>11} {'median ms':>10} {'GB/s':>8} {'vs reference':>13} {'first call s':>12}"
              f" {'of copy':>8} {'(moved)':>8}  note")
    out(header)
    out("-" * len(header))
    for r in results:
        shape = f"{r['rows']}x{r['cols']}"
        if "median_s" not in r:
            blank = f"{'':>10} {'':>8} {'':>13} {'':>12} {'':>8} {'':>8}"
            out(f"{r['backend']:<22} {shape:>11} {blank}  {r.get('note', '')}")
            continue
        ratio = _fmt_ratio(r.get("speedup_vs_reference"))
        if ratio and r.get("reference_basis", "measured") != "measured":
            ratio += "*"
        first = "" if r.get("first_call_s") is None else f"{r['first_call_s']:.2f}"
        note = r.get("note", "") + ("" if r.get("exact", True) else " (approximate)")
        copy = f"{r['of_copy_bandwidth']:.0%}" if "of_copy_bandwidth" in r else ""
        moved = f"{r['of_copy_bandwidth_moved']:.0%}" if "of_copy_bandwidth_moved" in r else ""
        if r.get("timing") == "events":
            note = (note + " (event timing)").strip()
        out(f"{r['backend']:<22} {shape:>11} {r['median_s'] * 1e3:>10.3f} {r['gbps']:>8.3f} {ratio:>13} {first:>12}"
            f" {copy:>8} {moved:>8}  {note}")
