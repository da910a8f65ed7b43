"""Block-scale layouts: the linear ``[N, K/16]`` layout of the checkpoint and the swizzled ones GEMMs read.

Both swizzles pad rows and scale columns with zeros and tile the scales:

* ``128x4`` (CUTLASS / TensorRT-LLM / FlashInfer ``block_scale_interleave``, SGLang ``swizzle_blockscale``):
  rows padded to 128, columns to 4; tile ``[128, 4]`` stored as ``[32, 4, 4]`` = (row % 32, row // 32 % 4,
  col % 4), tiles row-major over (row // 128, col // 4).
* ``8x4`` (FlashInfer ``is_sf_8x4_layout``): rows padded to 8, columns to 4; tile ``[8, 4]`` stored
  row-major, tiles row-major over (row // 8, col // 4).

Leading batch dimensions (``[E, N, K/16]`` for stacked experts) are kept. Pure torch, any device.
"""

from __future__ import annotations

import torch


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _pad(scales: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    *batch, n, k = scales.shape
    if (n, k) == (rows, cols):
        return scales
    # float8 tensors cannot be zero-filled by every torch version; pad their bytes instead.
    raw = scales.view(torch.uint8) if scales.element_size() == 1 else scales
    out = raw.new_zeros((*batch, rows, cols))
    out[..., :n, :k] = raw
    return out.view(scales.dtype)


def swizzle_128x4(scales: torch.Tensor) -> torch.Tensor:
    """Linear ``[..., N, K/16]`` scales -> padded ``[..., round_up(N, 128), round_up(K/16, 4)]`` 128x4 layout.

    The result's memory (flattened per batch entry) is what FlashInfer's ``block_scale_interleave`` returns.
    """
    *batch, n, k = scales.shape
    m, kp = _round_up(n, 128), _round_up(k, 4)
    tiles = _pad(scales, m, kp).reshape(*batch, m // 128, 4, 32, kp // 4, 4)
    nb = len(batch)
    perm = [*range(nb), nb, nb + 3, nb + 2, nb + 1, nb + 4]
    return tiles.permute(perm).contiguous().reshape(*batch, m, kp)


def unswizzle_128x4(swizzled: torch.Tensor, *, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_128x4`: the linear ``[..., rows, cols]`` scales, padding dropped."""
    *batch, m, kp = swizzled.shape
    tiles = swizzled.reshape(*batch, m // 128, kp // 4, 32, 4, 4)
    nb = len(batch)
    perm = [*range(nb), nb, nb + 3, nb + 2, nb + 1, nb + 4]
    linear = tiles.permute(perm).reshape(*batch, m, kp)
    return linear[..., :rows, :cols].contiguous()


def swizzle_8x4(scales: torch.Tensor) -> torch.Tensor:
    """Linear ``[..., N, K/16]`` scales -> padded ``[..., round_up(N, 8), round_up(K/16, 4)]`` 8x4 layout."""
    *batch, n, k = scales.shape
    m, kp = _round_up(n, 8), _round_up(k, 4)
    tiles = _pad(scales, m, kp).reshape(*batch, m // 8, 8, kp // 4, 4)
    nb = len(batch)
    perm = [*range(nb), nb, nb + 2, nb + 1, nb + 3]
    return tiles.permute(perm).contiguous().reshape(*batch, m, kp)


def unswizzle_8x4(swizzled: torch.Tensor, *, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_8x4`: the linear ``[..., rows, cols]`` scales, padding dropped."""
    *batch, m, kp = swizzled.shape
    tiles = swizzled.reshape(*batch, m // 8, kp // 4, 8, 4)
    nb = len(batch)
    perm = [*range(nb), nb, nb + 2, nb + 1, nb + 3]
    linear = tiles.permute(perm).reshape(*batch, m, kp)
    return linear[..., :rows, :cols].contiguous()
