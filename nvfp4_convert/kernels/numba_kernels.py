"""The numba kernels of the CPU backend (see :mod:`.cpu` for what they compute and why it is exact).

Importing this module imports numba and compiles nothing yet; :mod:`.cpu` imports it on first use. Compiled
code is cached on disk (next to this file, or numba's per-user cache directory when that is read-only); with
no writable location the kernels are compiled in memory on each run.
"""

import numba
import numpy as np

from ..constants import E2M1_BOUNDS, E2M1_TIE_UP_BOUNDS, E4M3_MAX, SCALE_MIN


def _jit(**options):
    """``numba.njit`` with the options every kernel needs (IEEE arithmetic, no GIL), cached when possible."""

    def compile(fn):
        try:
            return numba.njit(cache=True, fastmath=False, nogil=True, **options)(fn)
        except RuntimeError:  # no writable cache location: compile in memory each run
            return numba.njit(cache=False, fastmath=False, nogil=True, **options)(fn)

    return compile


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
_B0, _B1, _B2, _B3, _B4, _B5, _B6 = (np.float32(b) for b in E2M1_BOUNDS)
assert E2M1_TIE_UP_BOUNDS == (E2M1_BOUNDS[1], E2M1_BOUNDS[3], E2M1_BOUNDS[5])  # the strict comparisons below
_U_ABS32 = np.uint32(0x7FFFFFFF)


@_jit()
def absmax_bits(w, mask):
    """The largest sign-cleared bit pattern in ``w`` (unsigned integer bits of floats): for floats of
    one format the order of such patterns is the order of ``|x|``, and a NaN's exceeds infinity's."""
    m = w.dtype.type(0)
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            v = w[r, c] & mask
            if v > m:
                m = v
    return m


@_jit(inline="always")
def quantize_row(f, u, packed, scales, ws2, six_ws2, blk, blkf, codes):
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
    # 4, 5. E2M1 codes, packed
    encode_row(f, amf, packed, codes)


@_jit(inline="always")
def encode_row(f, divisors, packed, codes):
    """Packed E2M1 codes of one row ``f`` (float32) under per-block divisors ``float(scale) * ws2``."""
    k = f.shape[0]
    # E2M1 code of every element: a correctly rounded division by the block's divisor
    for b in range(k // 16):
        d = divisors[b]
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
    # pack: as little-endian uint16, pair j is lo | hi << 8 (both < 16); lo | hi << 4 is its byte
    pairs = codes.view(np.uint16)
    for j in range(k // 2):
        p = pairs[j]
        packed[j] = np.uint8((p | (p >> np.uint16(4))) & np.uint16(0xFF))


@_jit()
def quantize_f32(w, packed, scales, ws2, six_ws2):
    """Rows of a float32 ``w``; ``packed``/``scales`` are the matching output rows."""
    rows, k = w.shape
    wu = w.view(np.uint32)
    blk = np.empty((2, k // 16), dtype=np.uint32)
    blkf = blk.view(np.float32)
    codes = np.empty(k, dtype=np.uint8)
    for r in range(rows):
        quantize_row(w[r], wu[r], packed[r], scales[r], ws2, six_ws2, blk, blkf, codes)


@_jit()
def quantize_bf16(w, packed, scales, ws2, six_ws2):
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
        quantize_row(f, u, packed[r], scales[r], ws2, six_ws2, blk, blkf, codes)


@_jit()
def quantize_f16(w, packed, scales, ws2, six_ws2, f16_bits):
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
        quantize_row(f, u, packed[r], scales[r], ws2, six_ws2, blk, blkf, codes)


# -- the block-scale search (mse / mse-weighted): see :mod:`.search` for the arithmetic ---------------------

_F_SIX = np.float32(6.0)
_F_TWO = np.float32(2.0)
_F_HALF = np.float32(0.5)
_F_INF = np.float32(np.inf)
_F_NORMAL_MIN2 = np.float32(2.0**-125)  # halving a scale at least this large is exact


@_jit(inline="always")
def _term(x, hx, s, t):
    """``h * (x - q * s)^2`` for one element, ``q`` its E2M1 magnitude from the thresholds ``t`` of ``s``;
    also returns ``q``."""
    q = (_F_SIX - _F_TWO * np.float32(x <= t[6]) - _F_ONE * np.float32(x <= t[5])
         - _F_ONE * np.float32(x <= t[4]) - _F_HALF * np.float32(x <= t[3])
         - _F_HALF * np.float32(x <= t[2]) - _F_HALF * np.float32(x <= t[1])
         - _F_HALF * np.float32(x <= t[0]))
    e = x - q * s
    return (e * e) * hx, q


@_jit(inline="always")
def _loss(x, hx, s, t, d):
    """The loss of the block ``x`` (16 values ``|w|``, weights ``hx``) under candidate scale ``s`` with
    thresholds ``t``, summed in the reference's order; ``d`` is 16 floats of scratch."""
    t0, t1, t2, t3, t4, t5, t6 = t[0], t[1], t[2], t[3], t[4], t[5], t[6]
    for i in range(16):
        xi = x[i]
        q = (_F_SIX - _F_TWO * np.float32(xi <= t6) - _F_ONE * np.float32(xi <= t5)
             - _F_ONE * np.float32(xi <= t4) - _F_HALF * np.float32(xi <= t3)
             - _F_HALF * np.float32(xi <= t2) - _F_HALF * np.float32(xi <= t1)
             - _F_HALF * np.float32(xi <= t0))
        e = xi - q * s
        d[i] = (e * e) * hx[i]
    for i in range(8):
        d[i] = d[i] + d[i + 8]
    return ((d[0] + d[1]) + (d[2] + d[3])) + ((d[4] + d[5]) + (d[6] + d[7]))


@_jit(inline="always")
def _better(loss, j, best, bi):
    """Whether candidate ``j`` with ``loss`` beats the best so far: what the reference's ascending sweep
    with a strict ``<`` keeps (the least loss, the first index on a tie; NaN never wins)."""
    return loss < best or (loss == best and j < bi)


@_jit(inline="always")
def search_block(x, hx, cands, thr, d):
    """Index of the winning candidate for the block ``x`` (16 values ``|w|``, weights ``hx``), as the
    reference's sweep finds it.

    Candidates are visited from the one nearest the round-to-nearest scale outward, and one is evaluated
    only when the term of the block's largest element, a lower bound of its loss (the loss is a sum of
    non-negative terms, and rounding to nearest never lets such a sum fall below a term), does not rule
    it out. A direction stops once that bound rules out a candidate and can only grow from there on:
    downward when the largest element clips (``6 s <= max``), upward when it rounds to 0.5 from below
    half the scale or to 0. The result is the reference's exactly, the tie rule included."""
    n = cands.shape[0]
    m = 0
    xm = x[0]
    for i in range(1, 16):
        if x[i] > xm:
            xm = x[i]
            m = i
    hm = hx[m]
    lo, hi = 0, n  # first candidate with 6 s >= xm
    while lo < hi:
        mid = (lo + hi) // 2
        if _F_SIX * cands[mid] < xm:
            lo = mid + 1
        else:
            hi = mid
    j0 = min(lo, n - 1)
    best = _F_INF
    bi = 0
    loss = _loss(x, hx, cands[j0], thr[j0], d)
    if _better(loss, j0, best, bi):
        best, bi = loss, j0
    for j in range(j0 - 1, -1, -1):
        s = cands[j]
        bound, q = _term(xm, hm, s, thr[j])
        if bound > best:
            if q == _F_SIX and _F_SIX * s <= xm:
                break
            continue
        if bound == best and j > bi:
            continue
        loss = _loss(x, hx, s, thr[j], d)
        if _better(loss, j, best, bi):
            best, bi = loss, j
    for j in range(j0 + 1, n):
        s = cands[j]
        bound, q = _term(xm, hm, s, thr[j])
        if bound > best:
            if q == _F_ZERO or (q == _F_HALF and s >= _F_NORMAL_MIN2 and _F_HALF * s >= xm):
                break
            continue
        if bound == best and j > bi:
            continue
        loss = _loss(x, hx, s, thr[j], d)
        if _better(loss, j, best, bi):
            best, bi = loss, j
    return bi


@_jit(inline="always")
def search_row(f, u, a, h, cands, thr, sbytes, divs, packed, scales, divisors, codes, d):
    """One row (``f`` float32, ``u`` its bits): search every block, then encode with the winners' scales."""
    k = f.shape[0]
    au = a.view(np.uint32)
    for i in range(k):
        au[i] = u[i] & _U_ABS32
    for b in range(k // 16):
        j = search_block(a[b * 16 : b * 16 + 16], h[b * 16 : b * 16 + 16], cands, thr, d)
        scales[b] = sbytes[j]
        divisors[b] = divs[j]
    encode_row(f, divisors, packed, codes)


@_jit()
def search_f32(w, h, cands, thr, sbytes, divs, packed, scales):
    """``mse``/``mse-weighted`` quantization of float32 rows ``w`` with per-column weights ``h`` (all ones
    for ``mse``: multiplying by 1 is exact), candidate scales ``cands``, their thresholds ``thr``
    (:func:`.search.thresholds`), exported bytes ``sbytes`` and encode divisors ``divs``."""
    rows, k = w.shape
    wu = w.view(np.uint32)
    a = np.empty(k, dtype=np.float32)
    divisors = np.empty(k // 16, dtype=np.float32)
    codes = np.empty(k, dtype=np.uint8)
    d = np.empty(16, dtype=np.float32)
    for r in range(rows):
        search_row(w[r], wu[r], a, h, cands, thr, sbytes, divs, packed[r], scales[r], divisors, codes, d)


@_jit()
def search_bf16(w, h, cands, thr, sbytes, divs, packed, scales):
    """Like :func:`search_f32` for rows of bf16 bit patterns (uint16)."""
    rows, k = w.shape
    u = np.empty(k, dtype=np.uint32)
    f = u.view(np.float32)
    a = np.empty(k, dtype=np.float32)
    divisors = np.empty(k // 16, dtype=np.float32)
    codes = np.empty(k, dtype=np.uint8)
    d = np.empty(16, dtype=np.float32)
    for r in range(rows):
        for i in range(k):
            u[i] = np.uint32(w[r, i]) << np.uint32(16)
        search_row(f, u, a, h, cands, thr, sbytes, divs, packed[r], scales[r], divisors, codes, d)


@_jit()
def search_f16(w, h, cands, thr, sbytes, divs, packed, scales, f16_bits):
    """Like :func:`search_f32` for rows of fp16 bit patterns (uint16), widened through ``f16_bits``."""
    rows, k = w.shape
    u = np.empty(k, dtype=np.uint32)
    f = u.view(np.float32)
    a = np.empty(k, dtype=np.float32)
    divisors = np.empty(k // 16, dtype=np.float32)
    codes = np.empty(k, dtype=np.uint8)
    d = np.empty(16, dtype=np.float32)
    for r in range(rows):
        for i in range(k):
            u[i] = f16_bits[w[r, i]]
        search_row(f, u, a, h, cands, thr, sbytes, divs, packed[r], scales[r], divisors, codes, d)
