"""NVFP4 constants and the scale math shared by every backend."""

from __future__ import annotations

import torch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
SCALE_MIN = 2.0**-9
E2M1_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])

# ModelOpt computes global scales as ``amax / (6.0 * 448.0)``, dividing by a Python number, and its exports
# run on CUDA. There PyTorch replaces a division by a CPU scalar with a multiplication by the scalar's
# float32 reciprocal (aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu: ``inv_b = opmath_t(1.0) / b``,
# then ``a * inv_b``), which differs from the quotient by one ulp for about a quarter of all amax values.
# ``INV_GLOBAL`` is that float32 reciprocal, fl(1/2688) = 0x1.861862p-12, exactly representable as a float.
INV_GLOBAL = float.fromhex("0x1.861862p-12")
# The smallest global scale written: the smallest normal float32. Below it (max|x| < 2^-126 * 2688, about
# 3.2e-35, "denormal dust") ModelOpt's product is subnormal or 0, and engines take its reciprocal; dust
# then quantizes to (almost) all-zero codes, which is what it is.
GLOBAL_SCALE_MIN = 2.0**-126


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
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(rows, -1).long()
    values = E2M1_VALUES.to(packed.device)[codes].view(rows, -1, BLOCK)
    out = values * (scales.float() * ws2.float()).unsqueeze(-1)
    return out.view(rows, -1).to(dtype)
