"""NVFP4 constants and the scale math shared by every backend."""

from __future__ import annotations

import torch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
SCALE_MIN = 2.0**-9
E2M1_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """``weight_scale_2`` (float32, 0-dim) for a group whose max|W| is ``amax``: ``amax / (6 * 448)``.

    An all-zero group would give 0 and then 0/0 block scales; it gets 1.0 instead, which dequantizes
    the (all-zero) codes to exactly 0 as well. Stays on ``amax``'s device without a host sync.
    """
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax == 0, torch.ones_like(amax), amax / (E2M1_MAX * E4M3_MAX))


def dequantize(packed: torch.Tensor, scales: torch.Tensor, ws2: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Expand packed codes ``[R, K/2]`` with block scales ``[R, K/16]`` back to ``[R, K]`` values."""
    rows = packed.shape[0]
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(rows, -1).long()
    values = E2M1_VALUES.to(packed.device)[codes].view(rows, -1, BLOCK)
    out = values * (scales.float() * ws2.float()).unsqueeze(-1)
    return out.view(rows, -1).to(dtype)
