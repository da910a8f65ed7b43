"""Block scales chosen by least squared error: ModelOpt 0.47's NVFP4 MSE weight calibration, and a weighted form.

``rtn`` (the default elsewhere) takes each block's scale from its amax. ``mse`` is what ModelOpt's
``NVFP4MSECalibrator`` with ``fp8_scale_sweep`` exports: for every 16-element block it tries all 126 finite
positive E4M3 values ``c_k * 448`` as the block scale and keeps the one with the least squared error,
the first on a tie, then exports that scale through ModelOpt's static-quantizer path. ``mse-weighted``
minimizes ``sum_i h_i (w_i - q_i)^2`` instead, with one non-negative weight ``h_i`` per input channel
(a data-free importance proxy, or calibrated ``E[x_i^2]``); with all ``h_i = 1`` it equals ``mse``.

The arithmetic, in float32 with each step rounded once, follows ModelOpt's sweep kernel
(``nvfp4_fp8_sweep._fp8_scale_sweep_kernel``) as its source states it, with ModelOpt's GPU-side
constants (a division by a Python number is a multiplication by its float32 reciprocal there):

* candidates ``c_k = e4m3(k + 1) * fl(1/448)``, ``k = 0..125``; candidate scale ``s_k = (c_k * A) / 6``
  with ``A`` the group's global amax (fused partners share it, as ModelOpt's shared state does);
* per element ``x = |w| / s_k``, ``q`` its E2M1 magnitude (ties as ModelOpt's ``fp4_round_magnitude``),
  ``d = |w| - q * s_k``; block loss ``sum d*d`` (weighted: ``sum h * (d*d)``), summed as NumPy sums 16
  values: ``r_j = v_j + v_{j+8}``, then ``((r0+r1)+(r2+r3)) + ((r4+r5)+(r6+r7))``;
* the first ``k`` with the least loss wins; its amax ``fl(A * c_k)`` is exported as
  ``e4m3(clamp((amax * fl(1/6)) * 448 / (A * fl(1/6)), 2^-9, 448))``; codes are then round-to-nearest
  of ``w / (scale * weight_scale_2)`` exactly as for ``rtn``.

An all-zero group has no sweep in ModelOpt worth copying (it writes a zero global scale); it gets the
``rtn`` result. This module is the yardstick for every faster implementation of these modes.
"""

from __future__ import annotations

import torch

from ..constants import E2M1_BOUNDS
from . import reference
from .common import BLOCK, E4M3_MAX, SCALE_MIN, global_scale

SCALE_MODES = ("rtn", "mse", "mse-weighted")
NUM_CANDIDATES = 126
INV_SIX = float(torch.tensor(1.0) / torch.tensor(6.0))  # fl(1/6), ModelOpt's "/ 6.0" on a GPU
INV_E4M3_MAX = float(torch.tensor(1.0) / torch.tensor(E4M3_MAX))  # fl(1/448)
_CHUNK_BLOCKS = 1 << 15


def candidates() -> torch.Tensor:
    """The 126 sweep candidates ``c_k`` (float32, ascending): every finite positive E4M3 value times fl(1/448)."""
    values = torch.arange(1, NUM_CANDIDATES + 1, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return values * torch.tensor(INV_E4M3_MAX)


def candidate_scales(amax: torch.Tensor) -> torch.Tensor:
    """``s_k = (c_k * A) / 6`` for global amax ``A`` (float32 ``[126]``, non-decreasing)."""
    return (candidates() * amax.float().reshape(())) / torch.tensor(6.0)


def safe_scales(amax: torch.Tensor) -> torch.Tensor:
    """The candidate scales as the loss uses them (a zero scale, possible only for a zero amax, reads as 1)."""
    s = candidate_scales(amax)
    return torch.where(s == 0, torch.ones_like(s), s)


# E2M1 magnitude as a sum of steps: q = 6 - sum_i step_i * [x/s below bound i], where "below" is ``<=`` at
# the even bounds 0.25, 1.25, 2.5, 5 and ``<`` at 0.75, 1.75, 3.5 (ModelOpt's ``fp4_round_magnitude``).
STEPS = (0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 2.0)


def thresholds(scales: torch.Tensor) -> torch.Tensor:
    """``T [S, 7]`` (float32) with ``RN(x / s_j)`` below bound ``i`` exactly when ``x <= T[j, i]``, for every
    float32 ``x >= 0``: the largest such ``x``, found on the bit patterns with exact float32 division.

    ``RN(x / s)`` is non-decreasing in ``x``, so each condition holds on a prefix of the non-negative
    floats; with these thresholds a kernel finds every E2M1 magnitude of the sweep with compares alone,
    no division, and gets the same magnitudes as :func:`block_loss`.
    """
    s = scales.float().reshape(-1, 1).expand(-1, len(STEPS))
    bounds = torch.tensor(E2M1_BOUNDS).expand_as(s)
    inclusive = torch.tensor([True, False, True, False, True, False, True]).expand_as(s)

    def below(x):
        y = x / s
        return torch.where(inclusive, y <= bounds, y < bounds)

    inf = torch.tensor(float("inf"))
    t = (bounds * s).clamp(min=0)
    for _ in range(64):  # a few ulps from the product; the loop ends as soon as nothing moves
        down = ~below(t)
        up = below(torch.nextafter(t, inf)) & ~down
        if not (down.any() or up.any()):
            return t.contiguous()
        t = torch.where(down, torch.nextafter(t, -inf).clamp(min=0), torch.where(up, torch.nextafter(t, inf), t))
    raise AssertionError("E2M1 thresholds did not converge")


def tables(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a kernel needs per group, for global amax ``amax > 0``: the candidate scales as the loss uses
    them (float32 ``[126]``), their thresholds (``[126, 7]``), each candidate's exported block-scale byte
    (uint8 ``[126]``) and the float32 divisor ``float(scale) * weight_scale_2`` its codes are encoded with."""
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(())
    scales = safe_scales(amax)
    exported = export_scales(torch.arange(NUM_CANDIDATES), amax)
    divisors = exported.float() * global_scale(amax)
    return scales.contiguous(), thresholds(scales), exported.view(torch.uint8).contiguous(), divisors.contiguous()


def _magnitude(x: torch.Tensor) -> torch.Tensor:
    """E2M1 magnitude of ``x >= 0`` with ModelOpt's comparisons (NaN and anything above 5 give 6)."""
    q = torch.full_like(x, 6.0)
    for bound, value, inclusive in ((5.0, 4.0, True), (3.5, 3.0, False), (2.5, 2.0, True), (1.75, 1.5, False),
                                    (1.25, 1.0, True), (0.75, 0.5, False), (0.25, 0.0, True)):
        q = torch.where(x <= bound if inclusive else x < bound, torch.tensor(value), q)
    return q


def block_sum(v: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis of 16 in NumPy's pairwise order (see the module docstring)."""
    r = v[..., :8] + v[..., 8:]
    return ((r[..., 0] + r[..., 1]) + (r[..., 2] + r[..., 3])) + ((r[..., 4] + r[..., 5]) + (r[..., 6] + r[..., 7]))


def block_loss(a: torch.Tensor, s: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    """Loss of blocks ``a = |w|`` ``[B, 16]`` at scale ``s`` (a float32 scalar or ``[B, 1]``)."""
    s = torch.where(s == 0, torch.ones_like(s), s)
    d = a - _magnitude(a / s) * s
    sq = d * d
    return block_sum(sq if h is None else sq * h)


def best_candidates(weight: torch.Tensor, amax: torch.Tensor,
                    channel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Index ``k`` (int64 ``[R, K/16]``) of the winning candidate of every block of ``weight`` ``[R, K]``."""
    rows, k = weight.shape
    scales = candidate_scales(amax)
    a = weight.float().abs().reshape(-1, BLOCK)
    h = None
    if channel_weights is not None:
        h = channel_weights.float().reshape(1, k // BLOCK, BLOCK).expand(rows, -1, -1).reshape(-1, BLOCK)
    best = torch.zeros(a.shape[0], dtype=torch.int64)
    for start in range(0, a.shape[0], _CHUNK_BLOCKS):
        part = a[start : start + _CHUNK_BLOCKS]
        hp = None if h is None else h[start : start + _CHUNK_BLOCKS]
        best_loss = torch.full((part.shape[0],), float("inf"))
        idx = torch.zeros(part.shape[0], dtype=torch.int64)
        for j in range(NUM_CANDIDATES):
            loss = block_loss(part, scales[j], hp)
            better = loss < best_loss
            best_loss = torch.where(better, loss, best_loss)
            idx = torch.where(better, j, idx)
        best[start : start + _CHUNK_BLOCKS] = idx
    return best.view(rows, k // BLOCK)


def export_scales(best: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's static export of the winning candidates: ``float8_e4m3fn`` block scales."""
    amax = amax.float().reshape(())
    block_amax = amax * candidates()[best]
    scale = block_amax * torch.tensor(INV_SIX)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale = scale * torch.tensor(E4M3_MAX) / (amax * torch.tensor(INV_SIX))
    return scale.clamp(min=SCALE_MIN, max=E4M3_MAX).to(torch.float8_e4m3fn)


def quantize(weight: torch.Tensor, amax: torch.Tensor, channel_weights: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``mse`` (or, with ``channel_weights`` ``[K]``, ``mse-weighted``) quantization of rows of ``weight``.

    Args:
        weight: ``[R, K]`` rows of one module's weight (any float dtype, CPU).
        amax: the global amax ``A`` of the module's fused group (``weight_scale_2 = global_scale(A)``).
        channel_weights: per-input-channel error weights ``[K]`` (float32, finite, >= 0), or None.

    Returns:
        ``(packed uint8 [R, K/2], scales float8_e4m3fn [R, K/16])`` like the ``rtn`` backends.
    """
    weight = weight.detach().cpu()
    amax = torch.as_tensor(amax, dtype=torch.float32).cpu().reshape(())
    ws2 = global_scale(amax)
    if amax == 0:
        return reference.quantize(weight, ws2)
    scales = export_scales(best_candidates(weight, amax, channel_weights), amax)
    return reference.encode(weight, scales, ws2), scales
