"""The NVFP4 format's numbers and the names of what a quantized Linear stores, in one place (no torch).

NVFP4 stores a weight ``[N, K]`` as 4-bit E2M1 codes (two per byte, element ``2j`` in the low nibble), one
FP8-E4M3 scale per ``BLOCK`` consecutive elements of a row, and one FP32 global scale per tensor (shared
within a fused group). Dequantized value = ``E2M1_VALUES[code] * block_scale * weight_scale_2``.
"""

from __future__ import annotations

BLOCK = 16  # elements per block scale (ModelOpt's and the engines' ``group_size``)
E2M1_MAX = 6.0  # largest E2M1 magnitude
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_MIN = 2.0**-9  # smallest block scale written: the smallest float8_e4m3fn subnormal (ModelOpt clamps to it)
# Smallest global scale written: the smallest normal float32, so that it and its reciprocal (which engines
# take) are normal and finite. Below it (max|x| < 2^-126 * 2688, about 3.2e-35: "denormal dust") ModelOpt's
# value is subnormal or 0; dust then quantizes to (almost) all-zero codes, which is what it is.
GLOBAL_SCALE_MIN = 2.0**-126

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of codes 0..7; code | 8 is the negative
E2M1_VALUES = E2M1_GRID + tuple(-v for v in E2M1_GRID)  # value of each 4-bit code (code 8 is -0.0)
# Rounding boundaries (midpoints of the grid). |x| equal to one of the tie boundaries rounds up, to the
# even code; equal to any other boundary it rounds down (also to the even code).
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_TIE_UP_BOUNDS = (0.75, 1.75, 3.5)

# What a quantized module ``m`` stores, as ``m + suffix``: (suffix, safetensors dtype). The input scale
# is absent from weight-only (W4A16_NVFP4) checkpoints.
WEIGHT = ".weight"
WEIGHT_SCALE = ".weight_scale"
WEIGHT_SCALE_2 = ".weight_scale_2"
INPUT_SCALE = ".input_scale"
QUANTIZED_TENSORS = ((WEIGHT, "U8"), (WEIGHT_SCALE, "F8_E4M3"), (WEIGHT_SCALE_2, "F32"), (INPUT_SCALE, "F32"))
SCALE_SUFFIXES = (WEIGHT_SCALE, WEIGHT_SCALE_2, INPUT_SCALE)
SCALAR_SUFFIXES = (WEIGHT_SCALE_2, INPUT_SCALE)


def quantized_tensors(module: str, shape: tuple[int, int], *, weight_only: bool) -> list[tuple[str, str, tuple]]:
    """``(name, safetensors dtype, shape)`` of each tensor stored for ``module`` whose weight is ``shape``."""
    n, k = shape
    shapes = {WEIGHT: (n, k // 2), WEIGHT_SCALE: (n, k // BLOCK), WEIGHT_SCALE_2: (), INPUT_SCALE: ()}
    return [(module + suffix, dtype, shapes[suffix]) for suffix, dtype in QUANTIZED_TENSORS
            if not (weight_only and suffix == INPUT_SCALE)]
