"""Triton NVFP4 quantizer for CUDA GPUs, bit-exact with the reference.

Two kernels. ``_amax_kernel`` reduces max|w| with an integer atomic max on the float's bits (non-negative
floats order like their bit patterns). ``_quantize_kernel`` reads row tiles as 32-bit words (64-bit for
float32 inputs), each holding elements 2j and 2j+1, so the pair that shares an output byte arrives in one
thread; each thread holds whole 16-element blocks, so block maxima and scales need no shuffles. Every
rounding step is exact:

* block scale ``fp8(clamp(amax_b / (6 * ws2), 2^-9, 448))``: a correctly rounded quotient (below), then
  round-half-even to E4M3 by the hardware conversion on SM89+ and on the bits elsewhere;
* bfloat16/float16 on SM90+: no per-element division at all. The code of ``w`` is the number of seven
  per-block thresholds ``RD(m_i * d)`` that ``|w|`` exceeds (``_tile_16bit`` says why that is exact), found
  with packed two-element compares and counted with packed 16-bit adds;
* otherwise ``w / d`` with ``d = float(scale) * ws2``: the per-block reciprocal and its remainder give a
  quotient within one ulp, and one Markstein correction (exact FMA residual) rounds it correctly; E2M1
  round-half-even is then one FMA onto a magic constant chosen by the exponent.

Exact for all finite inputs; global scales outside [2^-80, 2^80] (tensors of denormal dust) take
``tl.div_rn``. NaN inputs are not handled bit-for-bit (the converter rejects them first).

``_search_kernel`` is the ``mse``/``mse-weighted`` block-scale search (:mod:`.search`), one block per lane:
the per-candidate thresholds and tables of :func:`.search.tables`, the loss summed in the reference's order
without FP contraction, candidates visited and pruned as :func:`.numba_kernels.search_block` does, codes
packed as above with a correctly rounded division.
"""

import contextlib
import functools
from typing import Optional, Tuple

import torch

from . import Backend
from .common import BLOCK, GLOBAL_SCALE_MIN, INV_GLOBAL, global_scale

try:
    import triton
    import triton.language as tl
except ImportError:  # the backend reports itself unavailable
    triton = None

# Quantize tile: block_r rows x block_b 16-element blocks; programs_per_sm persistent programs per SM.
CONFIG = {
    "block_r": 4, "block_b": 32, "num_warps": 4, "programs_per_sm": 32,
    "amax_block": 1024, "amax_iters": 16, "amax_warps": 8, "exact_div": False, "hw_fp8": True, "simd16": True,
    "search_blocks": 64, "search_warps": 2,  # search: blocks per program (one per lane), warps per program
}

_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


if triton is not None:
    _INV_GLOBAL = tl.constexpr(INV_GLOBAL)  # a float32 value, so the product is rounded once, as in common
    _GLOBAL_SCALE_MIN = tl.constexpr(GLOBAL_SCALE_MIN)
    _INF = tl.constexpr(float("inf"))

    @triton.jit(do_not_specialize=["n"])  # one compiled kernel for every tensor size
    def _amax_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        base = tl.program_id(0).to(tl.int64) * (BLOCK * ITERS)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.static_range(ITERS):
            o = base + i * BLOCK + offs
            x = tl.load(x_ptr + o, mask=o < n, other=0.0)
            acc = tl.maximum(acc, tl.abs(x.to(tl.float32)))
        tl.atomic_max(out_ptr, tl.max(acc, axis=0).to(tl.int32, bitcast=True), sem="relaxed")

    @triton.jit
    def _decode(words, KIND: tl.constexpr):
        """Split words into the float32 values of their low and high halves."""
        if KIND == 0:  # bfloat16: the bits are the top half of a float32
            lo = (words << 16).to(tl.float32, bitcast=True)
            hi = (words & -65536).to(tl.float32, bitcast=True)
        elif KIND == 1:
            lo = (words & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = (words >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:  # float32 pairs in int64 words
            lo = words.to(tl.int32).to(tl.float32, bitcast=True)
            hi = (words >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        return lo, hi

    @triton.jit
    def _round_e4m3(s):
        """Round s in [2^-9, 448] half-to-even to E4M3: (value as float32, E4M3 byte)."""
        bits = s.to(tl.int32, bitcast=True)
        e = (bits >> 23) - 127
        # bits to drop: 20 for normals; subnormals (e < -6) keep fewer, down to none at 2^-9
        drop = tl.where(e < -6, 14 - e, 20)
        lsb = ((bits | 0x800000) >> drop) & 1  # includes the implicit bit, which is the lsb at 2^-9
        r = ((bits + ((1 << (drop - 1)) - 1) + lsb) >> drop) << drop
        val = r.to(tl.float32, bitcast=True)
        er = (r >> 23) - 127
        byte = tl.where(er >= -6, ((er + 7) << 3) | ((r >> 20) & 7), (val * 512.0).to(tl.int32))
        return val, byte

    @triton.jit
    def _reciprocal(d):
        """(y, y_lo): y = RN(1/d) and the rounded remainder, y + y_lo = 1/d to about 2^-47."""
        y = tl.div_rn(tl.full(d.shape, 1.0, tl.float32), d)
        return y, tl.fma(-d, y, 1.0) * y

    @triton.jit
    def _div(w, d, y, y_lo, EXACT_DIV: tl.constexpr):
        """w / d rounded to nearest, for per-block d with (y, y_lo) = _reciprocal(d)."""
        if EXACT_DIV:
            q = tl.div_rn(w, d)
        else:
            q = tl.fma(w, y, w * y_lo)  # within one ulp of w / d
            q = tl.fma(tl.fma(-q, d, w), y, q)  # Markstein: the exact residual, then the rounding is correct
        return q

    @triton.jit
    def _nibble(q, w):
        """0x4B400000 + the E2M1 code of q = RN(w / d) with its sign bit (8 for q < 0: so not for -0.0).

        Ties to even, saturating at 6. With a = min(|q|, 6) the code is RNE(a * m) + c, where (m, c) is
        (2, 0) below 2, (1, 2) below 4 and (0.5, 4) above: one FMA onto 1.5 * 2^23 + c (whose ulp is 1)
        rounds a * m to an integer, once and exactly. The sign is taken from w, so that a quotient that
        overflowed (NaN after the correction; min() then gives 6) keeps it.
        """
        a = tl.minimum(tl.abs(q), 6.0)
        ek = tl.maximum(a.to(tl.int32, bitcast=True) >> 23, 127)  # biased exponent, 127 below 2.0
        m = ((255 - ek) << 23).to(tl.float32, bitcast=True)
        c = (0x4B400000 - 254 + 2 * ek + tl.where((w < 0.0) & (q != 0.0), 8, 0)).to(tl.float32, bitcast=True)
        return tl.fma(a, m, c).to(tl.int32, bitcast=True)

    @triton.jit
    def _packed(words, d, y, y_lo, KIND: tl.constexpr, EXACT_DIV: tl.constexpr):
        lo, hi = _decode(words, KIND)
        lo = _nibble(_div(lo, d, y, y_lo, EXACT_DIV), lo)
        hi = _nibble(_div(hi, d, y, y_lo, EXACT_DIV), hi)
        return (lo + (hi << 4) + 0xC00000).to(tl.uint8)  # = nibbles - 17 * 0x4B400000 (mod 2^32)

    @triton.jit
    def _block_scale(bamax, ws2, d6, y6, y6_lo, EXACT_DIV: tl.constexpr, HW_FP8: tl.constexpr):
        """E4M3 block scale of each block max: (byte, divisor d = float(scale) * ws2); d6 = 6 * ws2."""
        s = _div(bamax, d6, y6, y6_lo, EXACT_DIV)
        s = tl.where(s == 0.0, 1.0, tl.where(s == s, s, 448.0))  # NaN: the quotient overflowed
        s = tl.minimum(tl.maximum(s, 0.001953125), 448.0)
        if HW_FP8:  # cvt.rn.satfinite.e4m3x2.f32 (SM89+), round-half-even like the software path
            f8 = s.to(tl.float8e4nv)
            s8 = f8.to(tl.float32)
            sbyte = f8.to(tl.uint8, bitcast=True)
        else:
            s8, sbyte = _round_e4m3(s)
        return sbyte.to(tl.uint8), s8 * ws2

    @triton.jit
    def _tile(w0, w1, ws2, d6, y6, y6_lo, KIND: tl.constexpr, EXACT_DIV: tl.constexpr, HW_FP8: tl.constexpr):
        """Block scale bytes [R, B] and packed codes of both half-blocks [R, B, 4] of a tile."""
        lo0, hi0 = _decode(w0, KIND)
        lo1, hi1 = _decode(w1, KIND)
        bamax = tl.max(tl.maximum(tl.maximum(tl.abs(lo0), tl.abs(hi0)), tl.maximum(tl.abs(lo1), tl.abs(hi1))), axis=2)
        sbyte, d = _block_scale(bamax, ws2, d6, y6, y6_lo, EXACT_DIV, HW_FP8)
        y, y_lo = _reciprocal(d)
        y, y_lo, d = y[:, :, None], y_lo[:, :, None], d[:, :, None]
        return sbyte, _packed(w0, d, y, y_lo, KIND, EXACT_DIV), _packed(w1, d, y, y_lo, KIND, EXACT_DIV)

    # -- the 16-bit path (SM90+): codes from packed compares against exact per-block thresholds --------
    # With q = RN(|w| / d), E2M1 rounding steps up at seven boundaries, and q passes boundary b exactly
    # when |w| / d passes the float32 midpoint next to b (RNE sends the midpoint itself to b, whose last
    # mantissa bit is 0, and a quotient of two floats is never a midpoint). So the code is the number of
    # thresholds T_i = m_i * d that |w| exceeds, and |w| > m_i * d <=> |w| > RD(m_i * d) for |w| of the
    # input dtype: fma.rm gives RD to float32 exactly (b_i * d + h_i * d, h_i * d a power-of-two multiple),
    # then RD to bf16 is truncation and to fp16 cvt.rz. One packed compare covers two elements.

    @triton.jit
    def _asm2(asm: tl.constexpr, a, b):
        return tl.inline_asm_elementwise(asm, "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _rd_fma(b, d, c):
        return tl.inline_asm_elementwise("fma.rm.f32 $0, $1, $2, $3;", "=f,f,f,f", [b, d, c], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _rd_mul(a, b):
        return tl.inline_asm_elementwise("mul.rm.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True,
                                         pack=1)

    @triton.jit
    def _pair(t, KIND: tl.constexpr):
        """Non-negative float32 t rounded down to the 16-bit dtype, in both halves of a word."""
        if KIND == 0:
            bits = t.to(tl.int32, bitcast=True)
            return (bits & -65536) | ((bits >> 16) & 0xFFFF)
        else:
            return tl.inline_asm_elementwise("{ .reg .b16 h; cvt.rz.f16.f32 h, $1; mov.b32 $0, {h, h}; }", "=r,f", [t],
                                             dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _threshold(b, d, h, KIND: tl.constexpr):
        """RD((b + h) * d) in the 16-bit dtype, both halves of a word [R, B, 1]."""
        return _pair(_rd_fma(tl.full(d.shape, b, tl.float32), d, d * h), KIND)[:, :, None]

    @triton.jit
    def _ones(a, t, KIND: tl.constexpr):
        """1.0 in each 16-bit half where a > t, else 0.0 (packed bf16x2 / f16x2)."""
        if KIND == 0:
            return _asm2("set.gt.bf16x2.bf16x2 $0, $1, $2;", a, t)
        else:
            return _asm2("set.gt.f16x2.f16x2 $0, $1, $2;", a, t)

    @triton.jit
    def _gt(a, t, KIND: tl.constexpr):
        """0xFFFF in each 16-bit half where a > t."""
        if KIND == 0:
            return _asm2("set.gt.u32.bf16x2 $0, $1, $2;", a, t)
        else:
            return _asm2("set.gt.u32.f16x2 $0, $1, $2;", a, t)

    @triton.jit
    def _add2(a, b, KIND: tl.constexpr):
        if KIND == 0:
            return _asm2("add.rn.bf16x2 $0, $1, $2;", a, b)
        else:
            return _asm2("add.rn.f16x2 $0, $1, $2;", a, b)

    @triton.jit
    def _max_u16x2(a, b):
        return _asm2("max.u16x2 $0, $1, $2;", a, b)

    @triton.jit
    def _bytes_16bit(w, t0, t1, t2, t3, t4, t5, t6, tz, KIND: tl.constexpr):
        """Packed codes of words w: counts the thresholds each |w| exceeds in 16-bit float adds, onto a
        base whose low mantissa bits then hold the code (128 for bf16, 1024 for fp16: ulp 1)."""
        a = w & 0x7FFF7FFF
        base = 0x43004300 if KIND == 0 else 0x64006400
        acc = _add2(_ones(a, t0, KIND), base, KIND)
        acc = _add2(acc, _ones(a, t1, KIND), KIND)
        acc = _add2(acc, _ones(a, t2, KIND), KIND)
        acc = _add2(acc, _ones(a, t3, KIND), KIND)
        acc = _add2(acc, _ones(a, t4, KIND), KIND)
        acc = _add2(acc, _ones(a, t5, KIND), KIND)
        acc = _add2(acc, _ones(a, t6, KIND), KIND)
        eight = 0x41004100 if KIND == 0 else 0x48004800
        neg = _gt(tz, w, KIND) & eight  # 8.0 where w < -RD(2^-150 d): negative and not rounded to zero
        acc = _add2(acc, neg, KIND)
        return ((acc & 0xF) | ((acc >> 12) & ~0xF)).to(tl.uint8)  # low nibble: element 2j, high: 2j + 1

    @triton.jit
    def _tile_16bit(w0, w1, ws2, d6, y6, y6_lo, KIND: tl.constexpr):
        """Like _tile, for bfloat16/float16 words (SM90+)."""
        m16 = tl.reduce(_max_u16x2(w0 & 0x7FFF7FFF, w1 & 0x7FFF7FFF), 2, _max_u16x2)
        m16 = tl.maximum(m16 & 0xFFFF, (m16 >> 16) & 0xFFFF)
        if KIND == 0:
            bamax = (m16 << 16).to(tl.float32, bitcast=True)
        else:
            bamax = m16.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        sbyte, d = _block_scale(bamax, ws2, d6, y6, y6_lo, False, True)
        # (b, h): the float32 midpoints next to the E2M1 boundaries 0.25 .. 5, on the side RNE leaves to b
        t0 = _threshold(0.25, d, 2.0**-26, KIND)
        t1 = _threshold(0.75, d, -(2.0**-25), KIND)
        t2 = _threshold(1.25, d, 2.0**-24, KIND)
        t3 = _threshold(1.75, d, -(2.0**-24), KIND)
        t4 = _threshold(2.5, d, 2.0**-23, KIND)
        t5 = _threshold(3.5, d, -(2.0**-23), KIND)
        t6 = _threshold(5.0, d, 2.0**-22, KIND)
        tz = (_pair(_rd_mul(_rd_mul(d, 2.0**-75), 2.0**-75), KIND) | -2147450880)[:, :, None]  # negated: 0x80008000
        return (sbyte, _bytes_16bit(w0, t0, t1, t2, t3, t4, t5, t6, tz, KIND),
                _bytes_16bit(w1, t0, t1, t2, t3, t4, t5, t6, tz, KIND))

    @triton.jit
    def _load_tile(w_ptr, rt, bt, rows, nblk, rs8, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
        """Words of tile (rt, bt) as two half-blocks [BLOCK_R, BLOCK_B, 4] (masked off past the last row)."""
        r = (rt * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        b = bt * BLOCK_B + tl.arange(0, BLOCK_B)
        m = ((r[:, None] < rows) & (b[None, :] < nblk))[:, :, None]
        src = w_ptr + r[:, None, None] * (rs8 * 8) + b[None, :, None] * 8 + tl.arange(0, 4)[None, None, :]
        return tl.load(src, mask=m, other=0), tl.load(src + 4, mask=m, other=0)

    # Persistent along rows: program (p, bt) walks row tiles p, p + nprog, ... of block column bt and
    # loads the next tile before computing the current one, so loads stay in flight during the arithmetic.
    # Integer arguments are not specialized (fewer compiled variants); row offsets are written as multiples
    # of 8 words so the compiler still sees 32-byte aligned rows and emits 16-byte loads. Each block
    # arrives as two halves of 4 words held by one thread: its max and scale need no shuffles.
    @triton.jit(do_not_specialize=["rows", "nblk", "rs8"])
    def _quantize_kernel(
        w_ptr, packed_ptr, scales_ptr, scale_in_ptr, ws2_out_ptr, rows, nblk, rs8,
        KIND: tl.constexpr, FROM_AMAX: tl.constexpr, EXACT_DIV: tl.constexpr, HW_FP8: tl.constexpr,
        SIMD16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
    ):
        s_in = tl.load(scale_in_ptr)
        if FROM_AMAX:  # common.global_scale: amax * fl(1/2688), at least 2^-126, or 1.0 for an all-zero tensor
            ws2 = tl.where(s_in == 0.0, 1.0, tl.maximum(s_in * _INV_GLOBAL, _GLOBAL_SCALE_MIN))
        else:
            ws2 = s_in
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        bt = tl.program_id(1)
        if (pid == 0) & (bt == 0):
            tl.store(ws2_out_ptr, ws2)
        # Both fast paths need per-block divisors d = (2^-9 .. 448) * ws2 whose reciprocals and 2^-26 * d
        # stay normal; a tensor of (almost) nothing but denormal dust takes tl.div_rn instead.
        fast = (ws2 >= 2.0**-80) & (ws2 <= 2.0**80)
        d6 = 6.0 * ws2
        y6, y6_lo = _reciprocal(d6)
        j = tl.arange(0, 4)
        b = bt * BLOCK_B + tl.arange(0, BLOCK_B)
        w0, w1 = _load_tile(w_ptr, pid, bt, rows, nblk, rs8, BLOCK_R, BLOCK_B)
        for rt in range(pid, tl.cdiv(rows, BLOCK_R), nprog):
            n0, n1 = _load_tile(w_ptr, rt + nprog, bt, rows, nblk, rs8, BLOCK_R, BLOCK_B)
            r = (rt * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
            m2 = (r[:, None] < rows) & (b[None, :] < nblk)
            if fast:
                if SIMD16:
                    sbyte, p0, p1 = _tile_16bit(w0, w1, ws2, d6, y6, y6_lo, KIND)
                else:
                    sbyte, p0, p1 = _tile(w0, w1, ws2, d6, y6, y6_lo, KIND, EXACT_DIV, HW_FP8)
            else:
                sbyte, p0, p1 = _tile(w0, w1, ws2, d6, y6, y6_lo, KIND, True, HW_FP8)
            tl.store(scales_ptr + r[:, None] * nblk + b[None, :], sbyte, mask=m2)
            dst = packed_ptr + r[:, None, None] * (nblk * 8) + b[None, :, None] * 8 + j[None, None, :]
            tl.store(dst, p0, mask=m2[:, :, None])
            tl.store(dst + 4, p1, mask=m2[:, :, None])
            w0, w1 = n0, n1


    # -- the block-scale search (mse / mse-weighted) --------------------------------------------------------
    # The arithmetic is :mod:`.search`'s; the visiting order and its exact pruning are those of
    # :func:`.numba_kernels.search_block`, lane by lane. A lane holds one block as two halves ``[2, 2, 2]``
    # (elements 0-7 and 8-15, element ``4x + 2y + p`` at ``[x, y, p]``, ``p`` the word half), so the loss is
    # summed in the reference's order by splitting off the last axis (``r_j = d_j + d_{j+8}``, then
    # neighbours), and the kernel is compiled without FP contraction (``enable_fp_fusion=False``): each step
    # rounds once, as in the reference. Per-lane values are ``[NB, 1, 1, 1]`` to broadcast against the halves.

    @triton.jit
    def _grid_values(s):
        """``fl(g * s)`` for the eight E2M1 magnitudes ``g``: the ``q * s`` of every code."""
        return tl.zeros_like(s), 0.5 * s, s, 1.5 * s, 2.0 * s, 3.0 * s, 4.0 * s, 6.0 * s

    @triton.jit
    def _sq_err(a, h, v0, v1, v2, v3, v4, v5, v6, v7, t0, t1, t2, t3, t4, t5, t6, WEIGHTED: tl.constexpr):
        """``h * (a - q * s)^2``, ``q * s`` picked from the grid values ``v`` by the thresholds ``t`` of ``s``."""
        qs = tl.where(a <= t0, v0, tl.where(a <= t1, v1, tl.where(a <= t2, v2, tl.where(
            a <= t3, v3, tl.where(a <= t4, v4, tl.where(a <= t5, v5, tl.where(a <= t6, v6, v7)))))))
        e = a - qs
        if WEIGHTED:
            return (e * e) * h
        else:
            return e * e

    @triton.jit
    def _loss(a_lo, a_hi, h_lo, h_hi, v0, v1, v2, v3, v4, v5, v6, v7, t0, t1, t2, t3, t4, t5, t6,
              WEIGHTED: tl.constexpr):
        """Loss of each lane's block at one candidate, summed as :func:`.search.block_sum` sums."""
        r = (_sq_err(a_lo, h_lo, v0, v1, v2, v3, v4, v5, v6, v7, t0, t1, t2, t3, t4, t5, t6, WEIGHTED)
             + _sq_err(a_hi, h_hi, v0, v1, v2, v3, v4, v5, v6, v7, t0, t1, t2, t3, t4, t5, t6, WEIGHTED))
        even, odd = tl.split(r)
        left, right = tl.split(even + odd)  # [r0 + r1, r4 + r5], [r2 + r3, r6 + r7]
        q0, q1 = tl.split(left + right)
        return (q0 + q1)[:, None, None, None]

    @triton.jit
    def _lane_max(lo, hi):
        """Max over each lane's two halves, ``[NB, 1, 1, 1]``."""
        return tl.max(tl.max(tl.max(tl.maximum(lo, hi), axis=3), axis=2), axis=1)[:, None, None, None]

    @triton.jit
    def _at_first(hit_lo, hit_hi, e, x_lo, x_hi):
        """Each lane's ``x >= 0`` at its first element where ``hit`` holds (0 where none does)."""
        first = -_lane_max(tl.where(hit_lo, -e, -16), tl.where(hit_hi, -8 - e, -16))
        return _lane_max(tl.where(e == first, x_lo, 0.0), tl.where(e + 8 == first, x_hi, 0.0))

    @triton.jit
    def _candidate(cands_ptr, thr_ptr, j, on):
        """Scale ``s_j`` of each lane's candidate ``j`` and its seven thresholds."""
        t = thr_ptr + j * 7
        return (tl.load(cands_ptr + j, mask=on, other=1.0), tl.load(t, mask=on, other=0.0),
                tl.load(t + 1, mask=on, other=0.0), tl.load(t + 2, mask=on, other=0.0),
                tl.load(t + 3, mask=on, other=0.0), tl.load(t + 4, mask=on, other=0.0),
                tl.load(t + 5, mask=on, other=0.0), tl.load(t + 6, mask=on, other=0.0))

    @triton.jit(do_not_specialize=["nblocks", "nblk"])
    def _search_kernel(w_ptr, h_ptr, cands_ptr, thr_ptr, sbytes_ptr, divs_ptr, packed_ptr, scales_ptr, nblocks, nblk,
                       KIND: tl.constexpr, WEIGHTED: tl.constexpr, N: tl.constexpr, NB: tl.constexpr):
        """Blocks ``NB * pid ..`` of the row-major ``[R, K]`` weight: the winning candidate of each, its scale
        byte, and the block's codes under that candidate's divisor (packed as ``_quantize_kernel`` packs)."""
        two = tl.arange(0, 2)
        m = (2 * two[:, None] + two[None, :])[None, :, :]  # word of a half-block at [x, y]
        e = (4 * two[:, None, None] + 2 * two[None, :, None] + two[None, None, :])[None, :, :, :]
        b = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
        on3 = (b < nblocks)[:, None, None]
        on = (b < nblocks)[:, None, None, None]
        wp = w_ptr + b[:, None, None] * 8 + m  # a block is 8 words of two elements each
        w_lo = tl.load(wp, mask=on3, other=0)
        w_hi = tl.load(wp + 4, mask=on3, other=0)
        x0, x1 = _decode(w_lo, KIND)
        a_lo = tl.join(tl.abs(x0), tl.abs(x1))
        x0, x1 = _decode(w_hi, KIND)
        a_hi = tl.join(tl.abs(x0), tl.abs(x1))
        if WEIGHTED:
            hp = h_ptr + (b % nblk)[:, None, None, None] * 16 + e
            h_lo = tl.load(hp, mask=on, other=1.0)
            h_hi = tl.load(hp + 8, mask=on, other=1.0)
        else:  # unused
            h_lo = a_lo
            h_hi = a_hi
        # Elements whose terms bound the loss from below (a sum of non-negative terms rounded to nearest never
        # falls below one of them): the first largest one, and (weighted) the first with the largest h * a^2,
        # whose term grows the most once it clips.
        xm = _lane_max(a_lo, a_hi)
        hm = _at_first(a_lo == xm, a_hi == xm, e, h_lo, h_hi)
        if WEIGHTED:
            key_lo = (a_lo * a_lo) * h_lo
            key_hi = (a_hi * a_hi) * h_hi
            kk = _lane_max(key_lo, key_hi)
            ak = _at_first(key_lo == kk, key_hi == kk, e, a_lo, a_hi)
            hk = _at_first(key_lo == kk, key_hi == kk, e, h_lo, h_hi)
        else:
            ak = xm
            hk = hm
        # the first candidate with 6 s >= xm
        lo = tl.zeros_like(xm).to(tl.int32)
        hi = lo + N
        for _ in tl.static_range(7):
            go = lo < hi
            mid = (lo + hi) // 2
            below = 6.0 * tl.load(cands_ptr + mid, mask=go, other=0.0) < xm
            lo = tl.where(go & below, mid + 1, lo)
            hi = tl.where(go & ~below, mid, hi)
        j0 = tl.minimum(lo, N - 1)
        s, t0, t1, t2, t3, t4, t5, t6 = _candidate(cands_ptr, thr_ptr, j0, on)
        v0, v1, v2, v3, v4, v5, v6, v7 = _grid_values(s)
        loss = _loss(a_lo, a_hi, h_lo, h_hi, v0, v1, v2, v3, v4, v5, v6, v7, t0, t1, t2, t3, t4, t5, t6, WEIGHTED)
        first = loss < _INF
        best = tl.where(first, loss, _INF)
        bi = tl.where(first, j0, 0)
        # Downward (smaller scales): a candidate is evaluated unless a bound rules it out; a lane stops once a
        # bounding element clips (6 s <= a, so its term only grows further down) and its term exceeds the best.
        j = j0 - 1
        act = on & (j >= 0)
        while tl.max(act.to(tl.int32)) > 0:
            s, t0, t1, t2, t3, t4, t5, t6 = _candidate(cands_ptr, thr_ptr, j, act)
            v0, v1, v2, v3, v4, v5, v6, v7 = _grid_values(s)
            bm = _sq_err(xm, hm, v0, v1, v2, v3, v4, v5, v6, v7, t0, t1, t2, t3, t4, t5, t6, WEIGHTED)
            stop = (bm > best) & (xm > t6) & (v7 <= xm)
            if WEIGHTED:
                bk = _sq_err(ak, hk, v0, v1, v2, v3, v4, v5, v6, v7, t0, t1, t2, t3, t4, t5, t6, WEIGHTED)
                stop = stop | ((bk > best) & (ak > t6) & (v7 <= ak))
                bound = tl.maximum(bm, bk)
            else:
                bound = bm
            need = act & ~(bound > best) & ~((bound == best) & (j > bi))
            if tl.max(need.to(tl.int32)) > 0:
                loss = _loss(a_lo, a_hi, h_lo, h_hi, v0, v1, v2, v3, v4, v5, v6, v7, t0, t1, t2, t3, t4, t5, t6,
                             WEIGHTED)
                better = need & ((loss < best) | ((loss == best) & (j < bi)))
                best = tl.where(better, loss, best)
                bi = tl.where(better, j, bi)
            j = j - 1
            act = act & ~stop & (j >= 0)
        # Upward: every index here exceeds the best one's, so only a smaller loss wins. Once the largest element
        # rounds to 0, or to 0.5 from below half the scale, so does every element, and each term, hence the
        # loss, can only grow from there on: that candidate is the lane's last.
        j = j0 + 1
        act = on & (j < N)
        while tl.max(act.to(tl.int32)) > 0:
            s, t0, t1, t2, t3, t4, t5, t6 = _candidate(cands_ptr, thr_ptr, j, act)
            v0, v1, v2, v3, v4, v5, v6, v7 = _grid_values(s)
            bound = _sq_err(xm, hm, v0, v1, v2, v3, v4, v5, v6, v7, t0, t1, t2, t3, t4, t5, t6, WEIGHTED)
            if WEIGHTED:
                bound = tl.maximum(bound, _sq_err(ak, hk, v0, v1, v2, v3, v4, v5, v6, v7, t0, t1, t2, t3, t4, t5, t6,
                                                  WEIGHTED))
            need = act & (bound < best)
            if tl.max(need.to(tl.int32)) > 0:
                loss = _loss(a_lo, a_hi, h_lo, h_hi, v0, v1, v2, v3, v4, v5, v6, v7, t0, t1, t2, t3, t4, t5, t6,
                             WEIGHTED)
                better = need & (loss < best)
                best = tl.where(better, loss, best)
                bi = tl.where(better, j, bi)
            last = (xm <= t0) | ((xm <= t1) & (s >= 2.0**-125) & (v1 >= xm))
            j = j + 1
            act = act & ~last & (j < N)
        tl.store(scales_ptr + b[:, None, None, None], tl.load(sbytes_ptr + bi, mask=on, other=0), mask=on)
        d = tl.max(tl.load(divs_ptr + bi, mask=on, other=1.0), axis=3)  # [NB, 1, 1]
        pp = packed_ptr + b[:, None, None] * 8 + m
        tl.store(pp, _packed(w_lo, d, d, d, KIND, True), mask=on3)
        tl.store(pp + 4, _packed(w_hi, d, d, d, KIND, True), mask=on3)


def _launch_amax(weight: torch.Tensor, acc_i32: torch.Tensor) -> None:
    """Fold max|weight| into ``acc_i32`` (the int32 view of a non-negative float32), without a host sync."""
    flat = weight.reshape(-1)
    n = flat.numel()
    if n == 0:
        return
    cfg = CONFIG
    grid = (triton.cdiv(n, cfg["amax_block"] * cfg["amax_iters"]),)
    _amax_kernel[grid](flat, acc_i32, n, BLOCK=cfg["amax_block"], ITERS=cfg["amax_iters"], num_warps=cfg["amax_warps"])


def _launch_quantize(weight: torch.Tensor, scale: torch.Tensor, *, from_amax: bool):
    rows, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"K must be a multiple of {BLOCK}, got {k}")
    if weight.dtype not in _KIND:
        raise TypeError(f"unsupported dtype {weight.dtype}; expected bfloat16, float16 or float32")
    if weight.stride(1) != 1 or weight.stride(0) % BLOCK:
        weight = weight.contiguous()
    words = weight.view(torch.int64 if weight.dtype == torch.float32 else torch.int32)
    nblk = k // BLOCK
    packed = torch.empty((rows, k // 2), dtype=torch.uint8, device=weight.device)
    scales = torch.empty((rows, nblk), dtype=torch.float8_e4m3fn, device=weight.device)
    ws2_out = torch.empty((), dtype=torch.float32, device=weight.device)
    if rows and nblk:
        cfg = CONFIG
        # two tile shapes only, to keep the number of compiled variants small
        block_b = cfg["block_b"] if nblk >= cfg["block_b"] else 4
        block_r = cfg["block_r"] * cfg["block_b"] // block_b
        row_tiles, block_tiles = triton.cdiv(rows, block_r), triton.cdiv(nblk, block_b)
        programs = _sm_count(weight.device) * cfg["programs_per_sm"]
        grid = (min(row_tiles, max(1, programs // block_tiles)), block_tiles)
        _quantize_kernel[grid](
            words, packed, scales.view(torch.uint8), scale, ws2_out, rows, nblk, words.stride(0) // 8,
            KIND=_KIND[weight.dtype], FROM_AMAX=from_amax, EXACT_DIV=cfg["exact_div"], HW_FP8=_hw_fp8(weight.device),
            SIMD16=weight.dtype != torch.float32 and _simd16(weight.device), BLOCK_R=block_r, BLOCK_B=block_b,
            num_warps=cfg["num_warps"],
        )
    elif not from_amax:
        ws2_out.copy_(scale)
    else:
        ws2_out.copy_(global_scale(scale))
    return packed, scales, ws2_out


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _hw_fp8(device: torch.device) -> bool:
    return CONFIG["hw_fp8"] and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _simd16(device: torch.device) -> bool:
    # packed bf16x2 compares and max.u16x2 need SM90
    return CONFIG["simd16"] and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def _on(device: torch.device):
    # Triton launches on the current CUDA device; CPU tensors only occur under TRITON_INTERPRET=1.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _amax(weight: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros((), dtype=torch.float32, device=weight.device)
    with _on(weight.device):
        _launch_amax(weight, acc.view(torch.int32))
    return acc


def _quantize(weight: torch.Tensor,
              ws2: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _on(weight.device):
        if ws2 is None:
            acc = torch.zeros((), dtype=torch.float32, device=weight.device)
            _launch_amax(weight, acc.view(torch.int32))
            return _launch_quantize(weight, acc, from_amax=True)
        return _launch_quantize(weight, ws2.to(device=weight.device, dtype=torch.float32).reshape(()), from_amax=False)


# The custom ops make the kernels capturable by torch.compile and CUDA graphs. The converter calls the
# plain functions above: the first call through the op dispatcher imports much of torch (dynamo, sympy,
# distributed) and costs seconds of start-up.
@torch.library.custom_op("nvfp4_convert::amax", mutates_args=())
def amax_op(weight: torch.Tensor) -> torch.Tensor:
    """max|weight| as a float32 0-dim tensor on the weight's device."""
    return _amax(weight)


@amax_op.register_fake
def _(weight):
    return weight.new_empty((), dtype=torch.float32)


@torch.library.custom_op("nvfp4_convert::quantize", mutates_args=())
def quantize_op(weight: torch.Tensor,
                ws2: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4-quantize ``weight [R, K]`` on its GPU: ``(packed u8 [R, K/2], scales fp8 [R, K/16], ws2)``.

    ``ws2`` is the float32 global scale (a 0-dim tensor on the weight's device); when ``None`` it is derived
    from the weight's own amax on the device (no host sync) and returned.
    """
    return _quantize(weight, ws2)


@quantize_op.register_fake
def _(weight, ws2=None):
    rows, k = weight.shape
    return (
        weight.new_empty((rows, k // 2), dtype=torch.uint8),
        weight.new_empty((rows, k // BLOCK), dtype=torch.float8_e4m3fn),
        weight.new_empty((), dtype=torch.float32),
    )


def quantize_device(weight: torch.Tensor, *,
                    ws2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Device-resident entry point: CUDA ``weight [R, K]`` -> CUDA ``(packed, scales, ws2)``.

    ``ws2``: the group's float32 global scale as a 0-dim CUDA tensor, or ``None`` to derive it from this
    weight's amax on the device. Same as ``torch.ops.nvfp4_convert.quantize``; no host sync, so it can be
    captured by CUDA graphs and ``torch.compile``.
    """
    return quantize_op(weight, ws2)


def amax_device(weight: torch.Tensor) -> torch.Tensor:
    """max|weight| of a CUDA tensor as a float32 0-dim CUDA tensor (no host sync)."""
    return amax_op(weight)


def quantize_on_device(weight: torch.Tensor, ws2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` on the CPU or a GPU; outputs stay on the GPU."""
    dev = weight if weight.is_cuda else weight.to("cuda")
    packed, scales, _ = _quantize(dev, ws2.to(dev.device))
    return packed, scales


def quantize(weight: torch.Tensor, ws2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Registry entry point: ``weight`` on the CPU or a GPU; outputs on the CPU."""
    packed, scales = quantize_on_device(weight, ws2)
    return packed.cpu(), scales.cpu()


def _launch_search(weight: torch.Tensor, tables: tuple[torch.Tensor, ...], channel_weights: torch.Tensor | None):
    """``mse``/``mse-weighted`` packed codes and block scales of ``weight [R, K]`` on its device, from the
    :func:`.search.tables` of its group (on the same device)."""
    rows, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"K must be a multiple of {BLOCK}, got {k}")
    if weight.dtype not in _KIND:
        raise TypeError(f"unsupported dtype {weight.dtype}; expected bfloat16, float16 or float32")
    weight = weight.contiguous()
    words = weight.view(torch.int64 if weight.dtype == torch.float32 else torch.int32)
    nblk = k // BLOCK
    packed = torch.empty((rows, k // 2), dtype=torch.uint8, device=weight.device)
    scales = torch.empty((rows, nblk), dtype=torch.float8_e4m3fn, device=weight.device)
    cands, thr, sbytes, divs = tables
    h = cands if channel_weights is None else channel_weights.to(device=weight.device, dtype=torch.float32)
    if rows and nblk:
        cfg = CONFIG
        grid = (triton.cdiv(rows * nblk, cfg["search_blocks"]),)
        _search_kernel[grid](
            words, h.contiguous(), cands, thr, sbytes, divs, packed, scales.view(torch.uint8), rows * nblk, nblk,
            KIND=_KIND[weight.dtype], WEIGHTED=channel_weights is not None, N=cands.numel(), NB=cfg["search_blocks"],
            num_warps=cfg["search_warps"], enable_fp_fusion=False,
        )
    return packed, scales


@functools.lru_cache(maxsize=16)
def _search_tables(amax: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """:func:`.search.tables` of a global amax, on ``device`` (a fused group's chunks share them)."""
    from . import search as sweep

    return tuple(t.to(device) for t in sweep.tables(torch.tensor(amax, dtype=torch.float32)))


def search_on_device(weight: torch.Tensor, amax: torch.Tensor,
                     channel_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`search` on ``weight``'s own device (a CPU one under ``TRITON_INTERPRET=1``); outputs stay there."""
    from . import search as sweep

    amax = torch.as_tensor(amax, dtype=torch.float32).detach().cpu().reshape(())
    if amax == 0 or weight.dtype not in _KIND:
        packed, scales = sweep.quantize(weight, amax, channel_weights)
        return packed.to(weight.device), scales.to(weight.device)
    with _on(weight.device):
        return _launch_search(weight, _search_tables(float(amax), weight.device), channel_weights)


def search(weight: torch.Tensor, amax: torch.Tensor,
           channel_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Registry search: :func:`.search.quantize`'s contract and bits, computed on the GPU; outputs on the CPU."""
    packed, scales = search_on_device(weight if weight.is_cuda else weight.to("cuda"), amax, channel_weights)
    return packed.cpu(), scales.cpu()


def amax(weight: torch.Tensor) -> torch.Tensor:
    """Registry amax: max|weight| as a float32 0-dim tensor on the GPU."""
    return _amax(weight if weight.is_cuda else weight.to("cuda"))


def available() -> str | None:
    if triton is None:
        return "triton is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if torch.cuda.get_device_capability() < (8, 0):
        return "Triton needs compute capability 8.0 or newer"
    return None


BACKENDS = (
    Backend(
        name="triton",
        quantize=quantize,
        amax=amax,
        exact=True,
        device="cuda",
        available=available,
        priority=100,
        description="Triton kernel, bit-exact with ModelOpt 0.47; any CUDA GPU of compute capability 8.0+",
        quantize_device=quantize_on_device,
        search=search,
    ),
)
