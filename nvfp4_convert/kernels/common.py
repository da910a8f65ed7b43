"""The scale math, code packing and dequantization shared by every backend (the numbers: :mod:`..constants`)."""

from __future__ import annotations

import struct

import torch

from ..constants import BLOCK, E2M1_MAX, E4M3_MAX, GLOBAL_SCALE_MIN, SCALE_MIN
from ..constants import E2M1_VALUES as _E2M1_VALUES

__all__ = ["BLOCK", "E2M1_MAX", "E2M1_VALUES", "E4M3_MAX", "GLOBAL_SCALE_MIN", "SCALE_MIN", "dequantize",
           "global_scale", "grid_position", "is_dust", "pack_codes", "unpack_codes"]

E2M1_VALUES = torch.tensor(_E2M1_VALUES)  # value of each 4-bit code, as a float32 lookup table

# ModelOpt computes global scales as ``amax / (6.0 * 448.0)``, dividing by a Python number, and its exports
# run on CUDA. There PyTorch replaces a division by a CPU scalar with a multiplication by the scalar's
# float32 reciprocal (aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu: ``inv_b = opmath_t(1.0) / b``,
# then ``a * inv_b``), which differs from the quotient by one ulp for about a quarter of all amax values.
# ``INV_GLOBAL`` is that float32 reciprocal, fl(1/2688) = 0x1.861862p-12 (a float32 value, so products with
# it round once).
INV_GLOBAL = struct.unpack("f", struct.pack("f", 1.0 / (E2M1_MAX * E4M3_MAX)))[0]


def global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """``weight_scale_2`` (or ``input_scale``), float32 0-dim, for a group whose max|x| is ``amax``.

    The value ModelOpt's export writes on a GPU: ``amax * fl(1/2688)`` rounded once to float32, the same
    on every device, but never below :data:`GLOBAL_SCALE_MIN`, so that it and its reciprocal are normal,
    finite floats for every finite tensor. An all-zero group would give 0 and then 0/0 block scales; it
    gets 1.0 instead, which dequantizes the (all-zero) codes to exactly 0 as well. Stays on ``amax``'s
    device without a host sync.
    """
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax == 0, torch.ones_like(amax), torch.clamp(amax * INV_GLOBAL, min=GLOBAL_SCALE_MIN))


def is_dust(amax: torch.Tensor | float) -> bool:
    """Whether a group whose max|x| is ``amax`` gets the floored global scale (non-zero, below ~3.2e-35)."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return bool(amax > 0) and bool(amax * INV_GLOBAL < GLOBAL_SCALE_MIN)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, ws2: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Expand packed codes ``[R, K/2]`` with block scales ``[R, K/16]`` back to ``[R, K]`` values."""
    rows = packed.shape[0]
    values = E2M1_VALUES.to(packed.device)[unpack_codes(packed).long()].view(rows, -1, BLOCK)
    out = values * (scales.float() * ws2.float()).unsqueeze(-1)
    return out.view(rows, -1).to(dtype)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``uint8 [..., K]`` -> bytes ``uint8 [..., K/2]``: element ``2j`` in the low nibble."""
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: bytes ``uint8 [..., K/2]`` -> codes ``uint8 [..., K]``."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def grid_position(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes -> signed position on the E2M1 grid, -7..7 (both zeros 0), as int16."""
    magnitude = (codes & 0x7).to(torch.int16)
    return torch.where(codes & 0x8 > 0, -magnitude, magnitude)
