"""The reference quantizer's rounding, value by value (ties to even, saturation, signs, scales)."""

from __future__ import annotations

import pytest
import torch

from nvfp4_convert.constants import E2M1_VALUES
from nvfp4_convert.kernels import reference
from nvfp4_convert.kernels.common import pack_codes, unpack_codes

ONE = torch.tensor(1.0)  # weight_scale_2 = 1: a block whose max|w| is 6 gets block scale exactly 1

# (value, E2M1 code) with block scale 1; the code's value is E2M1_VALUES[code]
ROUNDING = [
    (0.0, 0b0000),
    (0.24, 0b0000),
    (0.25, 0b0000),   # tie between 0 and 0.5: to even (0)
    (0.26, 0b0001),
    (0.5, 0b0001),
    (0.75, 0b0010),   # tie between 0.5 and 1: to even (1.0)
    (1.25, 0b0010),   # tie between 1 and 1.5: to even (1.0)
    (1.5, 0b0011),
    (1.75, 0b0100),   # tie between 1.5 and 2: to even (2.0)
    (2.5, 0b0100),    # tie between 2 and 3: to even (2.0)
    (2.6, 0b0101),
    (3.5, 0b0110),    # tie between 3 and 4: to even (4.0)
    (5.0, 0b0110),    # tie between 4 and 6: to even (4.0)
    (5.01, 0b0111),
    (6.0, 0b0111),
    (-0.25, 0b1000),  # negative zero keeps its sign bit
    (-0.75, 0b1010),
    (-5.0, 0b1110),
    (-6.0, 0b1111),
]


@pytest.mark.parametrize("value,code", ROUNDING, ids=[f"{v:+g}" for v, _ in ROUNDING])
def test_rounding_table(value, code):
    block = torch.full((1, 16), 0.0)
    block[0, 0], block[0, 1] = 6.0, value  # max|w| = 6 fixes the block scale at 1
    packed, scales = reference.quantize(block, ONE)
    assert scales.float().item() == 1.0
    assert unpack_codes(packed)[0, 1].item() == code
    # the code is a nearest grid value (a tie goes to the even code, whose value is listed above)
    assert abs(abs(E2M1_VALUES[code]) - abs(value)) == min(abs(abs(g) - abs(value)) for g in E2M1_VALUES)


@pytest.mark.parametrize("amax,scale_byte", [
    (6.0, 0x38),          # 1.0
    (6.0 * 448, 0x7E),    # 448, the largest E4M3
    (6.0 * 1000, 0x7E),   # clamped to 448 (elements saturate at 6)
    (6.0 * 2**-9, 0x01),  # the smallest subnormal, 2^-9
    (6.0 * 2**-12, 0x01),  # clamped up to 2^-9
    (0.0, 0x38),          # an all-zero block gets scale 1
])
def test_block_scale_table(amax, scale_byte):
    block = torch.zeros(1, 16)
    block[0, 3] = amax
    _, scales = reference.quantize(block, ONE)
    assert scales.view(torch.uint8).item() == scale_byte


def test_packing_puts_the_even_element_in_the_low_nibble():
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x0]], dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(unpack_codes(packed), codes)
