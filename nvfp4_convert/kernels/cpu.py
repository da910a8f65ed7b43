"""Multi-threaded CPU NVFP4 quantizer compiled with numba, bit-exact with :mod:`.reference`.

The kernels do the reference's float32 arithmetic element by element, in the same order and with the
same IEEE rounding (no fast-math, no reciprocals), so every packed code and every FP8 block-scale byte
matches the reference for every input, NaN and infinity included:

* block amax: the maximum of the sign-cleared bit patterns (for IEEE floats of one sign the integer
  order is the value order, and a NaN pattern sorts above infinity, so NaN propagates as in torch);
* block scale: ``amax_b / float32(6 * ws2)``, ``0 -> 1``, clamped to ``[2^-9, 448]`` (NaN stays NaN),
  then rounded to float8_e4m3fn with round-half-to-even on the bit pattern (subnormals included; NaN
  gives ``0x7F`` as torch's cast does);
* element: ``x = w / float32(float(scale_fp8) * ws2)``, a correctly rounded float32 division, then the
  E2M1 code that ``searchsorted`` plus the tie rule gives, written as comparisons (NaN -> 7);
* sign bit from ``x < 0``; the even element goes to the low nibble.

bf16 inputs are widened to float32 by a 16-bit shift, fp16 through a 65536-entry table built by torch's
own fp16 -> fp32 conversion, fp32 is read in place. A kernel call works row by row with a row's worth
of scratch that stays in cache, in passes simple enough for LLVM to vectorize (the division runs as
``vdivps``, which is IEEE-exact). The kernels release the GIL, and a small thread pool
(:func:`set_threads`, default: every CPU this process may use) runs chunks of rows in parallel.

The kernels themselves live in :mod:`.numba_kernels`, imported (with numba) on first use, not at package
import. When it cannot be imported, :func:`available` says why and automatic backend selection falls back
to the reference.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import Backend, reference
from .common import BLOCK, E2M1_MAX

__all__ = ["amax", "available", "quantize", "set_threads", "threads"]

# ---------------------------------------------------------------------------------------------------
# Loading, threads, Python entry points
# ---------------------------------------------------------------------------------------------------

_KERNELS = None  # the numba_kernels module once imported
_LOAD_ERROR: str | None = None
_LOAD_LOCK = threading.Lock()

_THREADS: int | None = None  # None: every CPU this process may run on
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()
_CHUNKS_PER_THREAD = 4  # row chunks per thread, so a slow thread does not hold up the others
_MIN_PARALLEL_ELEMENTS = 1 << 16  # below this a weight is quantized on the calling thread
_MIN_AMAX_JOB_ELEMENTS = 1 << 20  # amax reads at memory speed: jobs of a few hundred microseconds
_MIN_JOB_ELEMENTS = 1 << 18  # ~0.3 ms of one thread's quantizing: a pool job costs tens of us of GIL-bound
# Python, so smaller jobs (an MoE expert cut into 64) would serialize on it instead of running in parallel

_SUPPORTED = (torch.bfloat16, torch.float16, torch.float32)
_F16_BITS: np.ndarray | None = None


def _f16_bits() -> np.ndarray:
    """float32 bit pattern of every fp16 bit pattern (index = the fp16 bits as uint16), from torch."""
    global _F16_BITS
    if _F16_BITS is None:
        patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16)  # wraps to the same bits
        _F16_BITS = patterns.view(torch.float16).float().view(torch.int32).numpy().view(np.uint32).copy()
    return _F16_BITS


def _load() -> str | None:
    """Import numba and the kernels (once); returns why that failed, or None."""
    global _KERNELS, _LOAD_ERROR
    if _KERNELS is not None or _LOAD_ERROR is not None:
        return _LOAD_ERROR
    with _LOAD_LOCK:
        if _KERNELS is not None or _LOAD_ERROR is not None:
            return _LOAD_ERROR
        if sys.byteorder != "little":
            _LOAD_ERROR = "the cpu kernels assume a little-endian machine"
            return _LOAD_ERROR
        try:
            _KERNELS = importlib.import_module(".numba_kernels", __package__)
        except Exception as exc:  # ImportError, or numba rejecting the installed numpy
            _LOAD_ERROR = f"numba cannot be imported ({type(exc).__name__}: {exc})"
    return _LOAD_ERROR


def available() -> str | None:
    """None when the backend can run here, else the reason it cannot."""
    return _load()


def _require() -> None:
    why_not = _load()
    if why_not:
        raise RuntimeError(f"cpu backend unavailable: {why_not}")


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def set_threads(n: int | None) -> None:
    """Threads the kernels use from now on; ``None`` or ``n <= 0`` means every CPU this process may use.

    Only this backend's kernels are affected (``amax`` runs on torch's own thread pool).
    """
    global _THREADS
    _THREADS = None if n is None or n <= 0 else int(n)


def threads() -> int:
    """Threads the next quantize call will use."""
    return _THREADS or _cpu_count()


def _pool(n: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE != n:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="nvfp4-cpu")
            _POOL_SIZE = n
        return _POOL


def _bits(weight: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a contiguous 16-bit CPU tensor's bit patterns."""
    return weight.view(torch.int16).numpy().view(np.uint16)


def _by_rows(fn, arrays: tuple[np.ndarray, ...], extra: tuple, chunks: int) -> list:
    """``fn(*row slices of arrays, *extra)`` over ``chunks`` ranges of rows, on the pool (on this thread for
    one); the results in row order. The kernels release the GIL, so the ranges run in parallel."""
    if chunks <= 1:
        return [fn(*arrays, *extra)]
    rows = arrays[0].shape[0]
    cuts = [rows * c // chunks for c in range(chunks + 1)]
    pool = _pool(threads())
    jobs = [pool.submit(fn, *(a[x:y] for a in arrays), *extra) for x, y in zip(cuts[:-1], cuts[1:])]
    return [job.result() for job in jobs]


def _run(kernel, w: np.ndarray, packed: np.ndarray, scales: np.ndarray, consts: tuple) -> None:
    """Run ``kernel`` over row chunks of ``w`` on the pool (the kernels release the GIL)."""
    rows, k = w.shape
    n = threads()
    if n == 1 or rows * k < _MIN_PARALLEL_ELEMENTS:
        kernel(w, packed, scales, *consts)
        return
    want = _CHUNKS_PER_THREAD * n
    # Too few rows to share out: blocks are independent and the outputs are row-major, so [R, K] can
    # be treated as [R * m, K / m] (with K / m still whole blocks) at no cost.
    m = 1
    while rows * m < want and (k // m) % (2 * BLOCK) == 0 and k // m >= 2048:
        m *= 2
    if m > 1:
        rows, k = rows * m, k // m
        w, packed, scales = w.reshape(rows, k), packed.reshape(rows, k // 2), scales.reshape(rows, k // BLOCK)
    _by_rows(kernel, (w, packed, scales), consts, min(rows, want, max(1, rows * k // _MIN_JOB_ELEMENTS)))


def quantize(weight: torch.Tensor, ws2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows of ``weight`` ``[R, K]`` (bf16/fp16/fp32) against the float32 global scale ``ws2``.

    Same contract and same bits as :func:`reference.quantize`: packed codes ``uint8 [R, K/2]`` (element
    2j in the low nibble) and block scales ``float8_e4m3fn [R, K/16]``, contiguous CPU tensors. Other
    dtypes are handed to the reference.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"K must be a multiple of {BLOCK}, got {k}")
    ws2 = torch.as_tensor(ws2).detach().to(device="cpu", dtype=torch.float32).reshape(())
    if weight.dtype not in _SUPPORTED:
        return reference.quantize(weight.detach().cpu(), ws2)
    _require()
    weight = weight.detach().cpu().contiguous()
    six_ws2 = E2M1_MAX * ws2  # rounded to float32 exactly as the reference rounds it
    packed = np.empty((rows, k // 2), dtype=np.uint8)
    scales = np.empty((rows, k // BLOCK), dtype=np.uint8)
    if rows and k:
        consts = (np.float32(ws2.item()), np.float32(six_ws2.item()))
        if weight.dtype == torch.float32:
            kernel, w = _KERNELS.quantize_f32, weight.numpy()
        elif weight.dtype == torch.bfloat16:
            kernel, w = _KERNELS.quantize_bf16, _bits(weight)
        else:
            kernel, w, consts = _KERNELS.quantize_f16, _bits(weight), (*consts, _f16_bits())
        _run(kernel, w, packed, scales, consts)
    return torch.from_numpy(packed), torch.from_numpy(scales).view(torch.float8_e4m3fn)


def amax(weight: torch.Tensor) -> torch.Tensor:
    """max|weight| as a float32 0-dim tensor, equal to the reference's (NaN if any element is NaN).

    The largest sign-cleared bit pattern, found by numba on this backend's pool (2-D weights): the same
    value as ``abs().amax()`` without its temporary copy, and without torch's threads, which would keep
    spinning beside the pool's quantize that follows.
    """
    if weight.dtype not in _SUPPORTED or weight.numel() == 0 or weight.dim() == 0:
        return reference.amax(weight)
    _require()
    weight = weight.detach().cpu().contiguous()
    flat = weight.reshape(-1, weight.shape[-1])  # any layout: only the largest magnitude matters
    if weight.dtype == torch.float32:
        bits, mask, as_float = flat.numpy().view(np.uint32), np.uint32(0x7FFFFFFF), torch.int32
    else:
        bits, mask, as_float = _bits(flat), np.uint16(0x7FFF), torch.int16
    rows, k = bits.shape
    chunks = min(rows, threads(), max(1, rows * k // _MIN_AMAX_JOB_ELEMENTS))
    top = max(_by_rows(_KERNELS.absmax_bits, (bits,), (mask,), chunks))
    return torch.tensor(int(top), dtype=as_float).view(weight.dtype).float()  # sign bit clear: fits signed


def search(weight: torch.Tensor, amax: torch.Tensor, channel_weights: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``mse``/``mse-weighted`` quantization (same contract and bits as :func:`.search.quantize`), searched
    and encoded row by row in one numba pass on the pool (see :func:`.numba_kernels.search_block`)."""
    from . import search as sweep

    amax = torch.as_tensor(amax, dtype=torch.float32).detach().cpu().reshape(())
    weight = weight.detach().cpu()
    rows, k = weight.shape
    if amax == 0 or not rows or not k or weight.dtype not in _SUPPORTED:
        return sweep.quantize(weight, amax, channel_weights)
    _require()
    weight = weight.contiguous()
    tables = sweep.tables(amax)
    h = (torch.ones(k) if channel_weights is None else channel_weights.float()).contiguous().numpy()
    consts = (h, *(t.numpy() for t in tables))
    if weight.dtype == torch.float32:
        kernel, w = _KERNELS.search_f32, weight.numpy()
    elif weight.dtype == torch.bfloat16:
        kernel, w = _KERNELS.search_bf16, _bits(weight)
    else:
        kernel, w, consts = _KERNELS.search_f16, _bits(weight), (*consts, _f16_bits())
    packed = np.empty((rows, k // 2), dtype=np.uint8)
    scales = np.empty((rows, k // BLOCK), dtype=np.uint8)
    n = threads()
    chunks = min(rows, _CHUNKS_PER_THREAD * n) if n > 1 and rows * k >= _MIN_PARALLEL_ELEMENTS else 1
    _by_rows(_search_rows, (w, packed, scales), (kernel, consts), chunks)
    return torch.from_numpy(packed), torch.from_numpy(scales).view(torch.float8_e4m3fn)


def _search_rows(w, packed, scales, kernel, consts) -> None:
    h, cands, thr, sbytes, divs, *extra = consts
    kernel(w, h, cands, thr, sbytes, divs, packed, scales, *extra)


BACKENDS = (
    Backend(
        name="cpu",
        quantize=quantize,
        amax=amax,
        exact=True,
        device="cpu",
        available=available,
        priority=10,
        description="numba, multi-threaded, bit-exact with the reference (bf16/fp16/fp32)",
        set_threads=set_threads,
        search=search,
    ),
)
