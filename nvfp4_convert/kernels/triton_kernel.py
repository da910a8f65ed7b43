"""Triton NVFP4 quantizer for CUDA GPUs, bit-exact with the reference.

Two kernels. ``_amax_kernel`` reduces max|w| with an integer atomic max on the float's bits (non-negative
floats order like their bit patterns). ``_quantize_kernel`` reads row tiles as 32-bit words (64-bit for
float32 inputs), each holding elements 2j and 2j+1, so the pair that shares an output byte arrives in one
thread without shuffles. Every rounding step is exact:

* block scale ``fp8(clamp(amax_b / (6 * ws2), 2^-9, 448))``: correctly rounded quotient, then
  round-half-even to E4M3 by the hardware conversion on SM89+ and on the bits elsewhere;
* element ``w / d`` with ``d = float(scale) * ws2``: the per-block reciprocal ``y = RN(1/d)`` (``tl.div_rn``)
  and two FMA corrections (Markstein: after the first the quotient is within one ulp, so the second
  rounds it correctly) -- as exact as ``tl.div_rn`` but without a division per element;
* E2M1: round-half-even by one exact float add below 1.0 and by an integer carry into the exponent above.

Exactness holds for finite inputs whose scaled values stay in float32's normal range (|w| >= ~2^-100);
NaN inputs are not handled bit-for-bit. The amax pass is bound by memory; the quantize kernel by
instruction issue (about 25 per element), so it is persistent and loads its next tile while computing.
"""

import contextlib
import functools
from typing import Optional, Tuple

import torch

from .common import BLOCK

try:
    import triton
    import triton.language as tl
except ImportError:  # the backend reports itself unavailable
    triton = None

# Quantize tile: block_r rows x block_b 16-element blocks; programs_per_sm persistent programs per SM.
CONFIG = {
    "block_r": 4, "block_b": 32, "num_warps": 4, "programs_per_sm": 8,
    "amax_block": 4096, "amax_iters": 8, "exact_div": False, "hw_fp8": True,
}

_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


if triton is not None:

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
    def _div(w, d, nd, y, EXACT_DIV: tl.constexpr):
        """w / d rounded to nearest; nd = -d and y = RN(1/d) are per-block."""
        if EXACT_DIV:
            q = tl.div_rn(w, d)
        else:
            q = w * y
            q = tl.fma(tl.fma(q, nd, w), y, q)
            q = tl.fma(tl.fma(q, nd, w), y, q)
        return q

    @triton.jit
    def _e2m1(q):
        """E2M1 code of float32 q: half-to-even, saturating at 6, sign bit only for q < 0."""
        bits = q.to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
        # |q| < 1: codes 0..2 are RNE(2|q|); adding 1.5 * 2^23 (ulp 1) rounds once, exactly
        sub = (tl.abs(q) * 2.0 + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
        # |q| >= 1: keep one mantissa bit (half-to-even); exponent|mantissa minus 1.0's gives the code
        nrm = ((mag + 0x1FFFFF + ((mag >> 22) & 1)) >> 22) - 252
        code = tl.where(mag < 0x3F800000, sub, tl.minimum(nrm, 7))
        return code | tl.where(q < 0.0, 8, 0)  # -0.0 keeps code 0

    @triton.jit
    def _packed(words, d, nd, y, KIND: tl.constexpr, EXACT_DIV: tl.constexpr):
        lo, hi = _decode(words, KIND)
        return (_e2m1(_div(lo, d, nd, y, EXACT_DIV)) | (_e2m1(_div(hi, d, nd, y, EXACT_DIV)) << 4)).to(tl.uint8)

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
        BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
    ):
        s_in = tl.load(scale_in_ptr)
        if FROM_AMAX:  # common.global_scale: amax / (6 * 448), or 1.0 for an all-zero tensor
            ws2 = tl.where(s_in == 0.0, 1.0, tl.div_rn(s_in, 2688.0))
        else:
            ws2 = s_in
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        bt = tl.program_id(1)
        if (pid == 0) & (bt == 0):
            tl.store(ws2_out_ptr, ws2)
        d6 = 6.0 * ws2
        y6 = tl.div_rn(1.0, d6)
        j = tl.arange(0, 4)
        b = bt * BLOCK_B + tl.arange(0, BLOCK_B)
        w0, w1 = _load_tile(w_ptr, pid, bt, rows, nblk, rs8, BLOCK_R, BLOCK_B)
        for rt in range(pid, tl.cdiv(rows, BLOCK_R), nprog):
            n0, n1 = _load_tile(w_ptr, rt + nprog, bt, rows, nblk, rs8, BLOCK_R, BLOCK_B)
            r = (rt * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
            m2 = (r[:, None] < rows) & (b[None, :] < nblk)
            lo0, hi0 = _decode(w0, KIND)
            lo1, hi1 = _decode(w1, KIND)
            bamax = tl.max(tl.maximum(tl.maximum(tl.abs(lo0), tl.abs(hi0)), tl.maximum(tl.abs(lo1), tl.abs(hi1))), axis=2)
            s = _div(bamax, d6, -d6, y6, EXACT_DIV)
            s = tl.where(s == 0.0, 1.0, s)
            s = tl.minimum(tl.maximum(s, 0.001953125), 448.0)
            if HW_FP8:  # cvt.rn.satfinite.e4m3x2.f32 (SM89+), round-half-even like the software path
                f8 = s.to(tl.float8e4nv)
                s8 = f8.to(tl.float32)
                sbyte = f8.to(tl.uint8, bitcast=True)
            else:
                s8, sbyte = _round_e4m3(s)
            tl.store(scales_ptr + r[:, None] * nblk + b[None, :], sbyte.to(tl.uint8), mask=m2)
            d = s8 * ws2
            y = tl.div_rn(tl.full([BLOCK_R, BLOCK_B], 1.0, tl.float32), d)[:, :, None]
            nd = (d * -1.0)[:, :, None]
            d = d[:, :, None]
            dst = packed_ptr + r[:, None, None] * (nblk * 8) + b[None, :, None] * 8 + j[None, None, :]
            tl.store(dst, _packed(w0, d, nd, y, KIND, EXACT_DIV), mask=m2[:, :, None])
            tl.store(dst + 4, _packed(w1, d, nd, y, KIND, EXACT_DIV), mask=m2[:, :, None])
            w0, w1 = n0, n1


def _launch_amax(weight: torch.Tensor, acc_i32: torch.Tensor) -> None:
    """Fold max|weight| into ``acc_i32`` (the int32 view of a non-negative float32), without a host sync."""
    flat = weight.reshape(-1)
    n = flat.numel()
    if n == 0:
        return
    cfg = CONFIG
    grid = (triton.cdiv(n, cfg["amax_block"] * cfg["amax_iters"]),)
    _amax_kernel[grid](flat, acc_i32, n, BLOCK=cfg["amax_block"], ITERS=cfg["amax_iters"], num_warps=8)


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
            BLOCK_R=block_r, BLOCK_B=block_b, num_warps=cfg["num_warps"],
        )
    elif not from_amax:
        ws2_out.copy_(scale)
    else:
        ws2_out.copy_(torch.where(scale == 0, 1.0, scale / 2688.0))
    return packed, scales, ws2_out


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _hw_fp8(device: torch.device) -> bool:
    return CONFIG["hw_fp8"] and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _on(device: torch.device):
    # Triton launches on the current CUDA device; CPU tensors only occur under TRITON_INTERPRET=1.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _amax(weight: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros((), dtype=torch.float32, device=weight.device)
    with _on(weight.device):
        _launch_amax(weight, acc.view(torch.int32))
    return acc


def _quantize(weight: torch.Tensor, ws2: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
def quantize_op(weight: torch.Tensor, ws2: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def quantize_device(weight: torch.Tensor, *, ws2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


from . import Backend, register  # noqa: E402  (imported by the package after Backend exists)

register(
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
    )
)
