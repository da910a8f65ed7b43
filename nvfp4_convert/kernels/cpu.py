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

numba is imported on first use, not at package import. When it cannot be imported, :func:`available`
says why and automatic backend selection falls back to the reference. Compiled code is cached on disk
(``cache=True``: next to this file, or numba's per-user cache directory when that is read-only); with no
writable location the kernels are compiled in memory on each run.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import Backend, reference, register
from .common import BLOCK, E2M1_MAX, E4M3_MAX, SCALE_MIN, global_scale

__all__ = ["amax", "available", "quantize", "set_threads", "threads", "warm_up"]

# ---------------------------------------------------------------------------------------------------
# Kernels. They are plain Python until ``_load`` compiles them and rebinds each name in this module to
# its numba dispatcher (so kernels that call each other by name call the compiled versions), which keeps
# numba out of ``import nvfp4_convert``.
# ---------------------------------------------------------------------------------------------------

_JIT_SPECS: list[tuple[str, dict]] = []


def _jit(**options):
    def mark(fn):
        _JIT_SPECS.append((fn.__name__, options))
        return fn

    return mark


_F_ZERO = np.float32(0.0)
_F_ONE = np.float32(1.0)
_F_SCALE_MIN = np.float32(SCALE_MIN)
_F_E4M3_MAX = np.float32(E4M3_MAX)
_F_E4M3_NORMAL_MIN = np.float32(2.0**-6)
_F_E4M3_SUBNORMAL_STEPS = np.float32(2.0**9)
_F_E4M3_SUBNORMAL_MIN = np.float32(2.0**-9)  # float8_e4m3fn subnormals are multiples of 2^-9
# E2M1 rounding boundaries. searchsorted counts the boundaries strictly below |x| and the tie rule adds
# one at 0.75, 1.75 and 3.5, so code = 7 - #{b : |x| <= b} (even boundaries) - #{b : |x| < b} (odd
# ones); NaN fails every comparison and gets 7, as searchsorted sorts NaN last.
_B0 = np.float32(0.25)
_B1 = np.float32(0.75)
_B2 = np.float32(1.25)
_B3 = np.float32(1.75)
_B4 = np.float32(2.5)
_B5 = np.float32(3.5)
_B6 = np.float32(5.0)
_U_ABS32 = np.uint32(0x7FFFFFFF)


@_jit(inline="always")
def _quantize_row(f, u, packed, scales, ws2, six_ws2, blk, blkf, codes):
    """One row: ``f`` float32 values and ``u`` the same memory as uint32. Scratch: ``blk``/``blkf``
    (uint32 and float32 views of one ``[2, K/16]`` buffer) and ``codes`` (a byte per element)."""
    k = f.shape[0]
    nb = k // 16
    am, amf, rn, rnf = blk[0], blkf[0], blk[1], blkf[1]
    # 1. block amax as the largest sign-cleared bit pattern
    for b in range(nb):
        m = np.uint32(0)
        for i in range(16):
            m = max(m, u[b * 16 + i] & _U_ABS32)
        am[b] = m
    # 2. float32 block scale, 0 -> 1, clamp (comparisons leave NaN as it is, like torch.clamp)
    for b in range(nb):
        s = amf[b] / six_ws2
        if s == _F_ZERO:
            s = _F_ONE
        if s < _F_SCALE_MIN:
            s = _F_SCALE_MIN
        elif s > _F_E4M3_MAX:
            s = _F_E4M3_MAX
        amf[b] = s
    # 3. round to float8_e4m3fn (half to even) and take the float32 divisor float(scale) * ws2.
    #    Normal range: round the 23-bit mantissa to 3 bits on the bit pattern (a carry bumps the
    #    exponent, as it should); the byte is then bits >> 20 with the exponent rebiased from 127 to 7.
    #    Subnormal range [2^-9, 2^-6): s * 2^9 is exact and rint rounds it half to even to 1..8 (8 being
    #    0x08, the smallest normal), which is the byte itself. NaN gives 0x7F. Written as selects so
    #    both loops vectorize.
    for b in range(nb):
        bits = am[b]
        rn[b] = (bits + np.uint32(0x7FFFF) + ((bits >> np.uint32(20)) & np.uint32(1))) & np.uint32(0xFFF00000)
    for b in range(nb):
        s = amf[b]
        steps = np.rint(s * _F_E4M3_SUBNORMAL_STEPS)
        if s < _F_E4M3_NORMAL_MIN:
            q = steps * _F_E4M3_SUBNORMAL_MIN
            sb = np.uint32(steps)
        else:
            q = rnf[b]
            sb = (rn[b] >> np.uint32(20)) - np.uint32(960)
        if s != s:
            q = s
            sb = np.uint32(0x7F)
        scales[b] = np.uint8(sb)
        amf[b] = q * ws2
    # 4. E2M1 code of every element: a correctly rounded division by the block's divisor
    for b in range(nb):
        d = amf[b]
        for i in range(16):
            x = f[b * 16 + i] / d
            a = np.abs(x)
            c = np.int32(7) - (
                np.int32(a <= _B0)
                + np.int32(a < _B1)
                + np.int32(a <= _B2)
                + np.int32(a < _B3)
                + np.int32(a <= _B4)
                + np.int32(a < _B5)
                + np.int32(a <= _B6)
            )
            c += np.int32(8) * np.int32(x < _F_ZERO)
            codes[b * 16 + i] = np.uint8(c)
    # 5. pack: as little-endian uint16, pair j is lo | hi << 8 (both < 16); lo | hi << 4 is its byte
    pairs = codes.view(np.uint16)
    for j in range(k // 2):
        p = pairs[j]
        packed[j] = np.uint8((p | (p >> np.uint16(4))) & np.uint16(0xFF))


@_jit()
def _quantize_f32(w, packed, scales, ws2, six_ws2):
    """Rows of a float32 ``w``; ``packed``/``scales`` are the matching output rows."""
    rows, k = w.shape
    wu = w.view(np.uint32)
    blk = np.empty((2, k // 16), dtype=np.uint32)
    blkf = blk.view(np.float32)
    codes = np.empty(k, dtype=np.uint8)
    for r in range(rows):
        _quantize_row(w[r], wu[r], packed[r], scales[r], ws2, six_ws2, blk, blkf, codes)


@_jit()
def _quantize_bf16(w, packed, scales, ws2, six_ws2):
    """Rows of bf16 bit patterns ``w`` (uint16)."""
    rows, k = w.shape
    u = np.empty(k, dtype=np.uint32)
    f = u.view(np.float32)
    blk = np.empty((2, k // 16), dtype=np.uint32)
    blkf = blk.view(np.float32)
    codes = np.empty(k, dtype=np.uint8)
    for r in range(rows):
        for i in range(k):
            u[i] = np.uint32(w[r, i]) << np.uint32(16)  # bf16 is the top half of a float32
        _quantize_row(f, u, packed[r], scales[r], ws2, six_ws2, blk, blkf, codes)


@_jit()
def _quantize_f16(w, packed, scales, ws2, six_ws2, f16_bits):
    """Rows of fp16 bit patterns ``w`` (uint16), widened through ``f16_bits`` (fp16 bits -> float32
    bits for all 65536 patterns, made by torch's own conversion; faster here than bit manipulation)."""
    rows, k = w.shape
    u = np.empty(k, dtype=np.uint32)
    f = u.view(np.float32)
    blk = np.empty((2, k // 16), dtype=np.uint32)
    blkf = blk.view(np.float32)
    codes = np.empty(k, dtype=np.uint8)
    for r in range(rows):
        for i in range(k):
            u[i] = f16_bits[w[r, i]]
        _quantize_row(f, u, packed[r], scales[r], ws2, six_ws2, blk, blkf, codes)


# ---------------------------------------------------------------------------------------------------
# Loading, threads, Python entry points
# ---------------------------------------------------------------------------------------------------

_NUMBA = None  # the numba module once the kernels are bound
_LOAD_ERROR: str | None = None
_LOAD_LOCK = threading.Lock()
_CACHE_NOTE: str | None = None  # why compiled code is not cached on disk, if it is not

_THREADS: int | None = None  # None: every CPU this process may run on
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()
_CHUNKS_PER_THREAD = 4  # row chunks per thread, so a slow thread does not hold up the others
_MIN_PARALLEL_ELEMENTS = 1 << 16  # below this a weight is quantized on the calling thread

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
    """Import numba and bind the kernels (once); returns why that failed, or None."""
    global _NUMBA, _LOAD_ERROR, _CACHE_NOTE
    if _NUMBA is not None or _LOAD_ERROR is not None:
        return _LOAD_ERROR
    with _LOAD_LOCK:
        if _NUMBA is not None or _LOAD_ERROR is not None:
            return _LOAD_ERROR
        if sys.byteorder != "little":
            _LOAD_ERROR = "the cpu kernels assume a little-endian machine"
            return _LOAD_ERROR
        try:
            import numba
        except Exception as exc:  # ImportError, or numba rejecting the installed numpy
            _LOAD_ERROR = f"numba cannot be imported ({type(exc).__name__}: {exc})"
            return _LOAD_ERROR
        g = globals()
        for name, options in _JIT_SPECS:
            fn = g[name]
            try:
                g[name] = numba.njit(cache=True, fastmath=False, nogil=True, **options)(fn)
            except RuntimeError as exc:  # no writable cache location: compile in memory each run
                _CACHE_NOTE = str(exc)
                g[name] = numba.njit(cache=False, fastmath=False, nogil=True, **options)(fn)
        _NUMBA = numba
    return None


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
    chunks = min(rows, want)
    cuts = [rows * c // chunks for c in range(chunks + 1)]
    pool = _pool(n)
    jobs = [pool.submit(kernel, w[a:b], packed[a:b], scales[a:b], *consts) for a, b in zip(cuts[:-1], cuts[1:])]
    for job in jobs:
        job.result()


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
            kernel, w = _quantize_f32, weight.numpy()
        elif weight.dtype == torch.bfloat16:
            kernel, w = _quantize_bf16, _bits(weight)
        else:
            kernel, w, consts = _quantize_f16, _bits(weight), (*consts, _f16_bits())
        _run(kernel, w, packed, scales, consts)
    return torch.from_numpy(packed), torch.from_numpy(scales).view(torch.float8_e4m3fn)


def amax(weight: torch.Tensor) -> torch.Tensor:
    """max|weight| as a float32 0-dim tensor, equal to the reference's (NaN if any element is NaN).

    ``max(|min|, |max|)`` from one ``aminmax`` pass: the same value as ``abs().amax()`` without the
    temporary copy, several times faster.
    """
    if weight.dtype not in _SUPPORTED or weight.numel() == 0:
        return reference.amax(weight)
    lo, hi = torch.aminmax(weight.detach())
    return torch.maximum(lo.abs(), hi.abs()).float()


def warm_up(dtypes: tuple[torch.dtype, ...] = _SUPPORTED) -> float:
    """Compile (or load from the on-disk cache) the kernels for ``dtypes``; returns the seconds spent."""
    start = time.perf_counter()
    _require()
    for dtype in dtypes:
        w = torch.ones(2, BLOCK, dtype=dtype)
        quantize(w, global_scale(amax(w)))
    return time.perf_counter() - start


_BACKEND = register(
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
    )
)
