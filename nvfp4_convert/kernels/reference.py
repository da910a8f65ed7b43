"""Pure-torch NVFP4 reference quantizer, bit-exact with ModelOpt 0.47 ``NVFP4QTensor.quantize``.

It runs on any device torch supports and is the yardstick every other backend is checked against.
"""

from __future__ import annotations

import torch

from ..constants import E2M1_BOUNDS, E2M1_TIE_UP_BOUNDS
from .common import BLOCK, E2M1_MAX, E4M3_MAX, SCALE_MIN, pack_codes

# searchsorted counts the boundaries below |x|; a value equal to a tie-up boundary gets the upper code.
_BOUNDS = torch.tensor(E2M1_BOUNDS)
_TIE_UP_BOUNDS = torch.tensor(E2M1_TIE_UP_BOUNDS)


def block_scales(blocks: torch.Tensor, ws2: torch.Tensor) -> torch.Tensor:
    """FP8-E4M3 scale of each 16-element block: ``fp8(clamp(amax_b / (6 * ws2), 2^-9, 448))``, 0 -> 1."""
    amax = blocks.abs().amax(-1).float()
    scale = amax / (E2M1_MAX * ws2)
    scale[scale == 0] = 1.0
    return scale.clamp(min=SCALE_MIN, max=E4M3_MAX).to(torch.float8_e4m3fn)


def cast_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to 4-bit E2M1 codes (ties to even, saturating at 6, sign bit from ``x < 0``)."""
    sign = (x < 0).to(torch.uint8)
    mag = x.abs()
    code = torch.searchsorted(_BOUNDS.to(x.device), mag, out_int32=True).to(torch.uint8)
    tie = (mag.unsqueeze(-1) == _TIE_UP_BOUNDS.to(x.device)).any(-1).to(torch.uint8)
    return (sign << 3) + code + tie


def quantize(weight: torch.Tensor, ws2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows of ``weight`` ``[R, K]`` against the float32 global scale ``ws2``.

    Returns the packed codes ``uint8 [R, K/2]`` (element 2j in the low nibble) and the block scales
    ``float8_e4m3fn [R, K/16]`` in plain row-major layout.
    """
    rows, k = weight.shape
    assert k % BLOCK == 0, "K must be a multiple of 16"
    ws2 = ws2.to(device=weight.device, dtype=torch.float32)
    scales = block_scales(weight.view(rows, k // BLOCK, BLOCK), ws2)
    return encode(weight, scales, ws2), scales


def encode(weight: torch.Tensor, scales: torch.Tensor, ws2: torch.Tensor) -> torch.Tensor:
    """Packed E2M1 codes ``uint8 [R, K/2]`` of ``weight`` ``[R, K]`` under given block scales and ``ws2``."""
    rows, k = weight.shape
    scaled = weight.view(rows, k // BLOCK, BLOCK) / (scales.float() * ws2).unsqueeze(-1)
    return pack_codes(cast_e2m1(scaled.view(rows, k)))


def amax(weight: torch.Tensor) -> torch.Tensor:
    """max|weight| as a float32 0-dim tensor (exact: the max of values of the input dtype)."""
    return weight.abs().amax().float()
