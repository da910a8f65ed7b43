"""Swizzled block-scale layouts against an element-by-element statement of FlashInfer's offsets."""

from __future__ import annotations

import pytest
import torch

from nvfp4_convert.kernels.layouts import swizzle_8x4, swizzle_128x4, unswizzle_8x4, unswizzle_128x4

SHAPES = [(1, 1), (5, 3), (127, 4), (128, 8), (129, 5), (256, 64), (300, 7)]


def _up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _offset_128x4(m: int, k: int, cols: int) -> int:
    # FlashInfer get_sf_out_offset_128x4: [mTile, kTile, 32 (m % 32), 4 (m % 128 // 32), 4 (k % 4)]
    return (m // 128) * (_up(cols, 4) // 4) * 512 + (k // 4) * 512 + (m % 32) * 16 + (m % 128) // 32 * 4 + k % 4


def _offset_8x4(m: int, k: int, cols: int) -> int:
    # FlashInfer get_sf_out_offset_8x4: [mTile, kTile, 8 (m % 8), 4 (k % 4)]
    return (m // 8) * (_up(cols, 4) // 4) * 32 + (k // 4) * 32 + (m % 8) * 4 + k % 4


def _by_offsets(scales: torch.Tensor, offset, row_tile: int) -> torch.Tensor:
    n, k = scales.shape
    out = torch.zeros(_up(n, row_tile) * _up(k, 4), dtype=torch.uint8)
    for i in range(n):
        for j in range(k):
            out[offset(i, j, k)] = scales[i, j]
    return out


def _random_scales(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 0x7F, shape, generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)


@pytest.mark.parametrize("n,k", SHAPES)
def test_128x4_matches_offsets_and_round_trips(n, k):
    scales = _random_scales(n, k)
    swizzled = swizzle_128x4(scales)
    assert swizzled.shape == (_up(n, 128), _up(k, 4)) and swizzled.dtype == torch.float8_e4m3fn
    assert torch.equal(swizzled.view(torch.uint8).reshape(-1),
                       _by_offsets(scales.view(torch.uint8), _offset_128x4, 128))
    assert torch.equal(unswizzle_128x4(swizzled, rows=n, cols=k).view(torch.uint8), scales.view(torch.uint8))


@pytest.mark.parametrize("n,k", SHAPES)
def test_8x4_matches_offsets_and_round_trips(n, k):
    scales = _random_scales(n, k, seed=1)
    swizzled = swizzle_8x4(scales)
    assert swizzled.shape == (_up(n, 8), _up(k, 4))
    assert torch.equal(swizzled.view(torch.uint8).reshape(-1), _by_offsets(scales.view(torch.uint8), _offset_8x4, 8))
    assert torch.equal(unswizzle_8x4(swizzled, rows=n, cols=k).view(torch.uint8), scales.view(torch.uint8))


@pytest.mark.parametrize("swizzle,unswizzle", [(swizzle_128x4, unswizzle_128x4), (swizzle_8x4, unswizzle_8x4)])
def test_batched_experts_swizzle_each_expert(swizzle, unswizzle):
    scales = _random_scales(3, 129, 6, seed=2)
    swizzled = swizzle(scales)
    for e in range(3):
        assert torch.equal(swizzled[e].view(torch.uint8), swizzle(scales[e]).view(torch.uint8))
    assert torch.equal(unswizzle(swizzled, rows=129, cols=6).view(torch.uint8), scales.view(torch.uint8))


def test_padding_is_zero_and_other_dtypes_work():
    scales = torch.arange(1, 1 + 130 * 5, dtype=torch.int32).reshape(130, 5).to(torch.bfloat16)
    swizzled = swizzle_128x4(scales)
    assert swizzled.dtype == torch.bfloat16
    assert (swizzled != 0).sum() == scales.numel()
    assert torch.equal(unswizzle_128x4(swizzled, rows=130, cols=5), scales)
