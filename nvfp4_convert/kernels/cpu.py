"""Multi-threaded CPU NVFP4 quantizer compiled with numba, bit-exact with :mod:`.reference`.

The kernels do the reference's float32 arithmetic element by element, in the same order and with the
same IEEE rounding (no fast-math, no reciprocals), so every packed code and every FP8 block-scale byte
matches the reference for every input, NaN and infinity included:

* block amax: the maximum of the sign-cleared bit patterns (for IEEE floats of one sign the integer
  order is the value order, and a NaN pattern sorts above infinity, so NaN propagates as in torch);
* block scale: ``amax_b / float32(6 * ws2)``, ``0 -> 1``, clamped to ``[2^-9, 448]`` (NaN stays NaN),
  then rounded to float8_e4m3fn with round-half-to-even on the bit pattern (subnormals included);
* element: ``x = w / float32(float(scale_fp8) * ws2)``, a correctly rounded float32 division, then the
  E2M1 code as ``searchsorted`` + tie rule would give it, written as comparisons (NaN -> 7);
* sign bit from ``x < 0``, low nibble = even element.

bf16 and fp16 inputs are widened to float32 exactly (bf16 by a shift, fp16 by bit manipulation that
handles subnormals, infinities and NaNs). numba is imported on first use, not at package import; when it
cannot be imported, :func:`available` says why and automatic selection falls back to the reference.
Compiled code is cached on disk (``cache=True``) when a cache directory is writable.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

from . import Backend, reference, register
from .common import BLOCK, E2M1_MAX, E4M3_MAX, SCALE_MIN

# ---------------------------------------------------------------------------------------------------
# numba kernels. They are written as plain Python here and compiled by ``_load`` (which rebinds each
# name to its compiled dispatcher), so importing this module does not import numba.
# ---------------------------------------------------------------------------------------------------

_JIT_SPECS: list[tuple[str, dict]] = []


def _jit(**options):
    def mark(fn):
        _JIT_SPECS.append((fn.__name__, options))
        return fn

    return mark


prange = range  # rebound to numba.prange by _load

_F_SIX = np.float32(6.0)
_F_ZERO = np.float32(0.0)
_F_ONE = np.float32(1.0)
_F_SCALE_MIN = np.float32(SCALE_MIN)
_F_E4M3_MAX = np.float32(E4M3_MAX)
_F_SUB_MUL = np.float32(512.0)  # 2^9: one float8_e4m3fn subnormal step is 2^-9
_F_NORM_MIN = np.float32(2.0**-6)
_B025 = np.float32(0.25)
_B075 = np.float32(0.75)
_B125 = np.float32(1.25)
_B175 = np.float32(1.75)
_B250 = np.float32(2.5)
_B350 = np.float32(3.5)
_B500 = np.float32(5.0)


@_jit(inline="always")
def _e4m3_byte(s):
    """float8_e4m3fn bits of a float32 that is NaN or in [2^-9, 448] (round half to even)."""
    if s != s:
        return np.uint8(0x7F)
    if s < _F_NORM_MIN:
        return np.uint8(np.rint(s * _F_SUB_MUL))  # exact multiply; 8 -> 0x08 == 2^-6, still right
    b = np.uint32(np.array([s], dtype=np.float32).view(np.uint32)[0])
    r = (b + np.uint32(0x7FFFF) + ((b >> np.uint32(20)) & np.uint32(1))) >> np.uint32(20)
    return np.uint8(r - np.uint32(960))  # rebias exponent 127 -> 7: (127 - 7) << 3


@_jit(inline="always")
def _quant_row(f, u, packed, scales, ws2, six_ws2, dec):
    """Quantize one row: ``f`` float32 values, ``u`` the same values' uint32 bits."""
    nb = f.shape[0] // 16
    for b in range(nb):
        base = b * 16
        m = np.uint32(0)
        for i in range(16):
            a = u[base + i] & np.uint32(0x7FFFFFFF)
            if a > m:
                m = a
        amax = np.array([m], dtype=np.uint32).view(np.float32)[0]
        s = amax / six_ws2
        if s == _F_ZERO:
            s = _F_ONE
        if s < _F_SCALE_MIN:
            s = _F_SCALE_MIN
        elif s > _F_E4M3_MAX:
            s = _F_E4M3_MAX
        sb = _e4m3_byte(s)
        scales[b] = sb
        d = dec[sb] * ws2
        ob = b * 8
        for j in range(8):
            x0 = f[base + 2 * j] / d
            x1 = f[base + 2 * j + 1] / d
            a0 = np.abs(x0)
            a1 = np.abs(x1)
            c0 = 7 - ((a0 <= _B025) + (a0 < _B075) + (a0 <= _B125) + (a0 < _B175) + (a0 <= _B250) + (a0 < _B350) + (a0 <= _B500))
            c1 = 7 - ((a1 <= _B025) + (a1 < _B075) + (a1 <= _B125) + (a1 < _B175) + (a1 <= _B250) + (a1 < _B350) + (a1 <= _B500))
            c0 += 8 * (x0 < _F_ZERO)
            c1 += 8 * (x1 < _F_ZERO)
            packed[ob + j] = np.uint8(c0 | (c1 << 4))


@_jit(parallel=True)
def _quantize_f32(w, packed, scales, ws2, six_ws2, dec):
    u = w.view(np.uint32)
    for r in prange(w.shape[0]):
        _quant_row(w[r], u[r], packed[r], scales[r], ws2, six_ws2, dec)


@_jit(parallel=True)
def _quantize_bf16(w, packed, scales, ws2, six_ws2, dec):
    k = w.shape[1]
    for r in prange(w.shape[0]):
        u = np.empty(k, dtype=np.uint32)
        for i in range(k):
            u[i] = np.uint32(w[r, i]) << np.uint32(16)
        _quant_row(u.view(np.float32), u, packed[r], scales[r], ws2, six_ws2, dec)


_NUMBA = None  # the numba module once loaded
_LOAD_ERROR: str | None = None
_LOAD_LOCK = threading.Lock()
_RUN_LOCK = threading.Lock()
_THREADS: int | None = None
_DEC = (torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy())


def _load() -> str | None:
    """Import numba and compile-bind the kernels once; returns why not, or None."""
    global _NUMBA, _LOAD_ERROR, prange
    if _NUMBA is not None or _LOAD_ERROR is not None:
        return _LOAD_ERROR
    with _LOAD_LOCK:
        if _NUMBA is not None or _LOAD_ERROR is not None:
            return _LOAD_ERROR
        try:
            import numba
        except Exception as exc:  # ImportError, or numba refusing this numpy version
            _LOAD_ERROR = f"numba cannot be imported ({type(exc).__name__}: {exc})"
            return _LOAD_ERROR
        g = globals()
        g["prange"] = numba.prange
        for name, options in _JIT_SPECS:
            fn = g[name]
            try:
                g[name] = numba.njit(cache=True, fastmath=False, nogil=True, **options)(fn)
            except RuntimeError:  # no writable cache location: compile in memory each run
                g[name] = numba.njit(fastmath=False, nogil=True, **options)(fn)
        _NUMBA = numba
    return None
