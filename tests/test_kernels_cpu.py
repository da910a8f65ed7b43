"""The numba CPU backend must give the reference's bytes (packed codes and FP8 block scales) exactly."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nvfp4_convert import kernels
from nvfp4_convert.kernels import cpu, reference
from nvfp4_convert.kernels.common import E2M1_VALUES, global_scale

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]
BOUNDARIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]


def assert_matches_reference(w: torch.Tensor, ws2: torch.Tensor, what: str = "") -> None:
    packed, scales = cpu.quantize(w, ws2)
    want_packed, want_scales = reference.quantize(w.contiguous(), ws2)
    rows, k = w.shape
    assert packed.dtype == torch.uint8 and packed.shape == (rows, k // 2) and packed.is_contiguous()
    assert scales.dtype == torch.float8_e4m3fn and scales.shape == (rows, k // 16) and scales.is_contiguous()
    assert packed.device.type == "cpu" and scales.device.type == "cpu"
    got_s, want_s = scales.view(torch.uint8), want_scales.view(torch.uint8)
    if not torch.equal(got_s, want_s):
        r, b = (got_s != want_s).nonzero()[0].tolist()
        block = w[r, 16 * b : 16 * b + 16].float().tolist()
        pytest.fail(f"{what}: scale byte at [{r}, {b}] is {got_s[r, b]:#04x}, reference {want_s[r, b]:#04x}; "
                    f"ws2={ws2.item()!r} block={block}")
    if not torch.equal(packed, want_packed):
        r, j = (packed != want_packed).nonzero()[0].tolist()
        pair = w[r, 2 * j : 2 * j + 2].float().tolist()
        pytest.fail(f"{what}: packed byte at [{r}, {j}] is {packed[r, j]:#04x}, reference {want_packed[r, j]:#04x}; "
                    f"ws2={ws2.item()!r} elements={pair} scale byte={got_s[r, (2 * j) // 16]:#04x}")


def f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# -- the backend is there, registered, and chosen ---------------------------------------------------


def test_backend_is_available_and_registered():
    # CI installs numba (a default dependency): an import failure must fail here, not skip
    assert cpu.available() is None, cpu.available()
    backend = kernels.get_backend("cpu")
    assert backend.exact and backend.device == "cpu" and backend.available() is None
    assert backend.priority > kernels.get_backend("reference").priority
    chosen = next(b for b, why_not in kernels.candidates("cpu") if why_not is None)
    assert chosen.name == "cpu" or chosen.priority > backend.priority
    assert backend.set_threads is cpu.set_threads


def test_unavailable_numba_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(cpu, "_KERNELS", None)
    monkeypatch.setattr(cpu, "_LOAD_ERROR", None)
    monkeypatch.setitem(sys.modules, "numba", None)  # makes `import numba` raise ImportError
    monkeypatch.delitem(sys.modules, "nvfp4_convert.kernels.numba_kernels", raising=False)
    why_not = cpu.available()
    assert why_not and "numba" in why_not
    chosen = next(b for b, why_not in kernels.candidates("cpu") if why_not is None)
    assert chosen.name != "cpu" and "numba" in kernels.get_backend("cpu").available()
    with pytest.raises(RuntimeError, match="numba"):
        cpu.quantize(torch.ones(1, 16), f32(1.0))


# -- randomized sweep ----------------------------------------------------------------------------

KINDS = ["normal", "heavy", "wide", "blocky"]
SHAPES = [(1, 16), (1, 4096), (3, 32), (2, 48), (7, 80), (5, 256), (17, 1040), (33, 128), (64, 16), (9, 4096)]


def _sample(kind: str, rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    normal = torch.randn(rows, k, generator=gen)
    if kind == "normal":
        return normal * 0.02
    if kind == "heavy":  # log-normal magnitudes: a few elements dominate their blocks and the tensor
        return normal * torch.exp(2.5 * torch.randn(rows, k, generator=gen))
    if kind == "wide":  # magnitudes from 2^-40 to 2^12: subnormal/clamped block scales, fp16 under/overflow
        exponent = torch.rand(rows, k, generator=gen) * 52 - 40
        return torch.sign(normal) * torch.exp2(exponent)
    if kind == "blocky":  # rows and blocks of very different size, zero blocks, -0.0 and exact grid values
        w = normal * torch.exp2(torch.randint(-30, 8, (rows, 1), generator=gen).float())
        blocks = w.view(rows, k // 16, 16)
        blocks *= torch.exp2(torch.randint(-24, 4, (rows, k // 16, 1), generator=gen).float())
        blocks[torch.rand(rows, k // 16, generator=gen) < 0.1] = 0.0
        w[torch.rand(rows, k, generator=gen) < 0.05] = -0.0
        grid = E2M1_VALUES[torch.randint(0, 16, (rows, k), generator=gen)]
        pick = torch.rand(rows, k, generator=gen) < 0.2
        w[pick] = grid[pick] * w.abs().amax().clamp(min=1e-30)
        return w
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_random_sweep_matches_reference(dtype, kind):
    gen = torch.Generator().manual_seed(1234 + 17 * DTYPES.index(dtype) + KINDS.index(kind))
    for rows, k in SHAPES:
        w = _sample(kind, rows, k, gen).to(dtype)
        own = reference.amax(w)
        if not torch.isfinite(own):  # fp16 overflow in "wide": keep the group amax finite
            w = torch.nan_to_num(w, posinf=65504.0, neginf=-65504.0)
            own = reference.amax(w)
        for label, ws2 in [
            ("own amax", global_scale(own)),
            ("group amax x3.7", global_scale(own * 3.7)),
            ("group amax x1e4", global_scale(own * 1e4)),
            ("amax / 50 (saturating)", global_scale(own / 50)),
        ]:
            assert_matches_reference(w, ws2, f"{kind} {tuple(w.shape)} {dtype} ws2 from {label}")


@settings(max_examples=120, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    rows=st.integers(1, 5),
    blocks=st.integers(1, 6),
    ws2_mode=st.sampled_from(["own", "free"]),
)
def test_hypothesis_matches_reference(data, dtype, rows, blocks, ws2_mode):
    values = data.draw(hnp.arrays(np.float32, (rows, 16 * blocks),
                                  elements=st.floats(width=32, allow_nan=True, allow_infinity=True,
                                                     allow_subnormal=True)))
    w = torch.from_numpy(values).to(dtype)
    if ws2_mode == "own":
        ws2 = global_scale(reference.amax(w).nan_to_num(0.0, 0.0, 0.0))
    else:
        ws2 = f32(data.draw(st.floats(float(np.float32(1e-30)), float(np.float32(1e30)), width=32)))
    assert_matches_reference(w, ws2, "hypothesis")


# -- explicit edge cases -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("exp", [-3, 0, 5])
def test_ties_at_every_e2m1_boundary(dtype, exp):
    # ws2 = 2^exp / 8 and a block amax of 6 * 2^exp give the scale 8 exactly and the divisor 2^exp, so
    # every element divides to exactly the value it was built from: each boundary is an exact tie
    ws2 = f32(2.0**exp / 8)
    d = 2.0**exp
    row = [6.0] + BOUNDARIES + [-b for b in BOUNDARIES] + [0.0]
    row += [x for b in BOUNDARIES for x in (math.nextafter(b, 0), math.nextafter(b, 9))]  # fp32 neighbours
    row += [-x for b in BOUNDARIES for x in (math.nextafter(b, 0), math.nextafter(b, 9))]
    row += [0.0] * (-len(row) % 16)
    w = (torch.tensor(row, dtype=torch.float64) * d).float().view(-1, 16).to(dtype)
    w[:, 0] = 6.0 * d  # every block has the same amax, so the same divisor
    assert_matches_reference(w, ws2, "ties")
    packed, scales = cpu.quantize(w, ws2)
    assert (scales.float() == 8.0).all()
    codes = torch.stack([packed & 15, packed >> 4], -1).view(-1)
    assert codes[1:8].tolist() == [0, 2, 2, 4, 4, 6, 6]  # ties go to the even neighbour
    assert codes[8:15].tolist() == [8, 10, 10, 12, 12, 14, 14]


def test_zero_blocks_negative_zero_and_all_zero_tensor():
    for dtype in DTYPES:
        w = torch.zeros(3, 64, dtype=dtype)
        w[0, 3] = -0.0
        ws2 = global_scale(cpu.amax(w))  # 1.0 for an all-zero group
        assert ws2.item() == 1.0
        assert_matches_reference(w, ws2, "all zero")
        packed, scales = cpu.quantize(w, ws2)
        assert (packed == 0).all() and (scales.float() == 1.0).all()
        w[1, 16:32] = torch.linspace(-3, 3, 16)
        w[1, 17] = -0.0
        w[2, 40:42] = torch.tensor([-1e-3, 3.0])  # a negative that rounds to 0 keeps its sign: code 8
        ws2 = global_scale(cpu.amax(w))
        assert_matches_reference(w, ws2, "zero blocks")
        packed, scales = cpu.quantize(w, ws2)
        assert scales.view(torch.uint8)[0].tolist() == [0x38] * 4  # zero block -> scale 1.0
        assert packed[0, 1].item() == 0  # -0.0 is code 0
        assert packed[2, 20].item() & 0x0F == 0x08


def test_tiny_blocks_clamp_to_min_scale_and_huge_values_saturate():
    for dtype in DTYPES:
        w = torch.zeros(2, 48, dtype=dtype)
        w[0, :16] = 1000.0
        w[0, 16:32] = torch.linspace(-1, 1, 16).to(dtype) * 1e-4  # amax_b / (6 ws2) < 2^-9 -> clamp
        w[1, 32:48] = -torch.arange(16).to(dtype) * 100
        ws2 = global_scale(cpu.amax(w))
        assert_matches_reference(w, ws2, "tiny blocks")
        assert cpu.quantize(w, ws2)[1].view(torch.uint8)[0, 1].item() == 0x01  # 2^-9
        small = global_scale(torch.tensor(1.0))  # far below max|W|: scale clamps at 448, codes at 6
        assert_matches_reference(w, small, "saturation")
        packed, scales = cpu.quantize(w, small)
        assert scales.view(torch.uint8)[0, 0].item() == 0x7E and packed[0, 0].item() == 0x77


def test_fp8_scale_rounding_every_boundary():
    # ws2 = float32(1/6) makes 6 * ws2 round to exactly 1.0, so each block's scale is its amax: put
    # every fp8 value, every midpoint between neighbours (a tie) and the float32 values next to those
    # midpoints, subnormal and clamped ranges included, into a block of its own
    ws2 = f32(1 / 6)
    assert (6.0 * ws2).item() == 1.0
    fp8 = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    mids = (fp8[:-1] + fp8[1:]) / 2
    amax = torch.cat([fp8, mids,
                      torch.tensor([2.0**-10, 2.0**-9 * 0.75, 1.5 * 2**-9, 447.9, 448.0, 460.0, 1e30])]).float()
    amax = torch.cat([amax, torch.nextafter(amax, torch.tensor(0.0)), torch.nextafter(amax, torch.tensor(1e38))])
    gen = torch.Generator().manual_seed(7)
    amax = torch.cat([amax, torch.exp2(torch.rand(4000, generator=gen) * 20 - 11)]).float()
    w = torch.rand(amax.numel(), 16, generator=gen) * amax[:, None]
    w[:, 5] = -amax
    assert_matches_reference(w, ws2, "fp8 rounding")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_16_bit_pattern(dtype):
    # all 65536 bit patterns (zeros, subnormals, normals, infinities, NaNs), each next to a fixed
    # companion so their own widening to float32 decides the codes
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).float()
    finite = bits[torch.isfinite(bits)]
    companions = torch.tensor([1.0, -0.4, 3.0, 1e-3], dtype=torch.float32).repeat(finite.numel())[: finite.numel()]
    w = torch.stack([finite, companions], -1).view(-1, 16).to(dtype)
    for ws2 in (global_scale(reference.amax(w)), f32(2.0**-20), f32(1e-3)):
        assert_matches_reference(w, ws2, "finite patterns")
    w = bits.view(-1, 16).to(dtype)  # blocks holding inf/NaN turn to scale 448 / NaN like the reference
    assert_matches_reference(w, f32(0.01), "all patterns")


def test_non_finite_inputs_match_reference():
    for dtype in DTYPES:
        w = torch.randn(4, 64).to(dtype)
        w[0, 3] = float("nan")
        w[1, 20] = float("inf")
        w[2, 33] = -float("inf")
        w[3, 60] = -float("nan")
        assert_matches_reference(w, global_scale(torch.tensor(2.0)), "non-finite")
        assert torch.isnan(cpu.amax(w)) and torch.isnan(reference.amax(w))


# -- amax, layout, threads, errors ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_amax_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    for shape in [(1, 16), (7, 48), (256, 512)]:
        for sign in (1.0, -1.0):
            w = (sign * torch.rand(shape, generator=gen) * 3).to(dtype)
            got = cpu.amax(w)
            assert got.dtype == torch.float32 and got.dim() == 0
            assert torch.equal(got, reference.amax(w))
    zeros = torch.full((2, 16), -0.0, dtype=dtype)
    assert cpu.amax(zeros).item() == 0.0 and math.copysign(1, cpu.amax(zeros).item()) == 1
    w = torch.randn(2048, 1024, generator=gen).to(dtype)  # several pool jobs
    w[1500, 7] = -70.0
    assert cpu.amax(w).item() == 70.0 and torch.equal(cpu.amax(w), reference.amax(w))
    w[3, 3] = -float("inf")
    assert cpu.amax(w).item() == float("inf")
    w[2000, 1] = float("nan")
    assert torch.isnan(cpu.amax(w))
    for shape in [(40,), (3, 8, 48)]:  # a vector, stacked experts
        w = (torch.rand(shape, generator=gen) - 0.5).to(dtype)
        assert torch.equal(cpu.amax(w), reference.amax(w))


def test_thread_count_does_not_change_results():
    gen = torch.Generator().manual_seed(11)
    w = (torch.randn(96, 4096, generator=gen) * torch.rand(96, 1, generator=gen)).bfloat16()  # pool path
    ws2 = global_scale(reference.amax(w))
    assert_matches_reference(w, ws2, "default threads")
    want = cpu.quantize(w, ws2)
    try:
        for n in (1, 2, 3):
            cpu.set_threads(n)
            assert cpu.threads() == n
            got = cpu.quantize(w, ws2)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1].view(torch.uint8), want[1].view(torch.uint8))
        w = torch.randn(1, 1 << 17, generator=gen).half()  # one long row: split along K into pool work
        assert_matches_reference(w, global_scale(reference.amax(w)), "one long row, 3 threads")
    finally:
        cpu.set_threads(None)
    assert cpu.threads() >= 1


def test_layout_and_shape_handling():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(64, 48, generator=gen)
    w = base.t()  # non-contiguous [48, 64]
    ws2 = global_scale(reference.amax(w))
    assert_matches_reference(w, ws2, "transposed")
    packed, scales = cpu.quantize(torch.empty(0, 32), ws2)
    assert packed.shape == (0, 16) and scales.shape == (0, 2)
    with pytest.raises(ValueError):
        cpu.quantize(torch.ones(2, 24), ws2)
    with pytest.raises(ValueError):
        cpu.quantize(torch.ones(32), ws2)
    p, s = cpu.quantize(base[:4, :32].double(), ws2)  # other dtypes go to the reference
    rp, rs = reference.quantize(base[:4, :32].double(), ws2)
    assert torch.equal(p, rp) and torch.equal(s.view(torch.uint8), rs.view(torch.uint8))


# -- straight against ModelOpt -------------------------------------------------------------------


def _modelopt_cases():
    gen = torch.Generator().manual_seed(47)
    yield "bf16 normal", (torch.randn(32, 256, generator=gen) * 0.05).bfloat16(), None
    heavy = torch.randn(16, 128, generator=gen) * torch.exp(2 * torch.randn(16, 128, generator=gen))
    yield "fp16 heavy", heavy.half(), None
    yield "fp32 blocky", _sample("blocky", 8, 160, gen), None
    w = torch.tensor([6.0] + BOUNDARIES + [-b for b in BOUNDARIES] + [-0.1]).view(1, 16).repeat(2, 1)
    w[1] = 0.0
    yield "ties and zero block", w.bfloat16(), f32(0.125)
    w = _sample("wide", 4, 64, gen).bfloat16()
    yield "wide with group scale", w, global_scale(reference.amax(w) * 100)


def test_matches_modelopt_directly():
    qtensor = pytest.importorskip("modelopt.torch.quantization.qtensor")
    for what, w, ws2 in _modelopt_cases():
        ws2 = global_scale(cpu.amax(w)) if ws2 is None else ws2
        q, s, _ = qtensor.NVFP4QTensor.quantize(w.clone(), 16, None, ws2)
        packed, scales = cpu.quantize(w, ws2)
        assert torch.equal(packed, q._quantized_data), what
        assert torch.equal(scales.view(torch.uint8), s.view(torch.uint8).view(scales.shape)), what
