"""Backend self-check and selection, on the CPU: synthetic good, broken and approximate backends, and
automatic selection on faked SM100 / SM90 / GPU-less machines."""

from __future__ import annotations

import pytest
import torch

from nvfp4_convert import kernels
from nvfp4_convert.kernels import Backend, flashinfer_backends, reference, selfcheck, triton_kernel
from nvfp4_convert.kernels.common import BLOCK
from nvfp4_convert.kernels.selfcheck import BackendRefused, prove, select_proven_backend


def _backend(name, quantize, *, exact=True, device="cpu", priority=0):
    return Backend(name=name, quantize=quantize, amax=reference.amax, exact=exact, device=device, priority=priority)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    return (codes[:, 1::2] << 4) | codes[:, 0::2]


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def _noop(w, ws2):
    rows, k = w.shape
    return torch.empty(rows, k // 2, dtype=torch.uint8), torch.empty(rows, k // BLOCK, dtype=torch.float8_e4m3fn)


def _zeros(w, ws2):
    rows, k = w.shape
    scales = torch.zeros(rows, k // BLOCK, dtype=torch.uint8).view(torch.float8_e4m3fn)
    return torch.zeros(rows, k // 2, dtype=torch.uint8), scales


_STALE: dict = {}


def _stale(w, ws2):
    """The same never-written buffers for every call of a shape, as a kernel that does nothing returns."""
    rows, k = w.shape
    if (rows, k) not in _STALE:
        g = torch.Generator().manual_seed(rows * k)
        _STALE[rows, k] = (
            torch.randint(0, 256, (rows, k // 2), generator=g, dtype=torch.uint8),
            torch.randint(0, 0x7F, (rows, k // BLOCK), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn),
        )
    return _STALE[rows, k]


def _stale_patched(w, ws2):
    """Stale buffers in which a wrapper re-quantizes the blocks whose (garbage) scale byte is 0, as the
    FlashInfer wrapper does: the real failure mode of FlashInfer's FP4 kernel on SM90."""
    packed, scales = (t.clone() for t in _stale(w, ws2))
    zero = scales.view(torch.uint8) == 0
    if zero.any():
        rows, cols = zero.nonzero(as_tuple=True)
        p, s = reference.quantize(w.view(w.shape[0], -1, BLOCK)[rows, cols], ws2)
        packed.view(packed.shape[0], -1, BLOCK // 2)[rows, cols] = p
        scales.view(torch.uint8)[rows, cols] = s.view(torch.uint8)[:, 0]
    return packed, scales


def _one_bit_off(w, ws2):
    packed, scales = reference.quantize(w, ws2)
    if w.shape == (64, 256) and w.dtype == torch.float16:  # a single byte of a single probe
        packed[5, 9] ^= 1
    return packed, scales


def _scale_off(w, ws2):
    packed, scales = reference.quantize(w, ws2)
    if w.dtype == torch.bfloat16 and w.shape[0] == 129:
        scales = scales.view(torch.uint8).clone()
        scales[128, 1] += 1
        scales = scales.view(torch.float8_e4m3fn)
    return packed, scales


def _approx(w, ws2):
    """FlashInfer-style arithmetic: products with rounded reciprocals instead of correctly rounded divisions."""
    rows, k = w.shape
    blocks = w.float().view(rows, -1, BLOCK)
    s = blocks.abs().amax(-1) * torch.reciprocal(ws2 * 6.0)
    s = torch.where(s == 0, torch.ones_like(s), s).clamp(2**-9, 448).to(torch.float8_e4m3fn)
    x = blocks * torch.reciprocal(s.float() * ws2).unsqueeze(-1)
    return _pack(reference.cast_e2m1(x.view(rows, k))), s


_BOUNDARIES = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _nudged(window, prob):
    """The approximate backend, with codes of values within ``window`` (relative) of an E2M1 rounding
    boundary moved to the other neighbour with probability ``prob``: what a less accurate division does."""

    def quantize(w, ws2):
        rows, k = w.shape
        packed, s = _approx(w, ws2)
        x = (w.float().view(rows, -1, BLOCK) / (s.float() * ws2).unsqueeze(-1)).view(rows, k).abs()
        near = ((x.unsqueeze(-1) - _BOUNDARIES).abs() < window * _BOUNDARIES).any(-1)
        codes = _unpack(packed)
        mag = (codes & 7).long()
        step = torch.where(_GRID[mag] <= x, 1, -1)
        pick = near & (torch.rand(x.shape, generator=torch.Generator().manual_seed(rows * k)) < prob)
        return _pack(torch.where(pick, (codes & 8) | (mag + step).clamp(0, 7).to(torch.uint8), codes)), s

    return quantize


def _scales_two_steps(w, ws2):
    packed, scales = _approx(w, ws2)
    s = scales.view(torch.uint8).clone()
    s[0, 0] = s[0, 0] + 2 if s[0, 0] < 0x7D else s[0, 0] - 2
    return packed, s.view(torch.float8_e4m3fn)


def test_reference_proves_exact():
    selfcheck._expected.cache_clear()  # include building the probes and their reference outputs
    proof = prove(kernels.get_backend("reference"))
    assert proof.exact and proof.probes >= 30


def test_probes_cover_only_the_dtypes_asked_for():
    proof = prove(kernels.get_backend("reference"), dtypes=(torch.bfloat16,))
    assert proof.exact and proof.probes < 15


def test_every_available_cpu_backend_is_exact():
    for backend in kernels.backends().values():
        if backend.device == "cpu" and backend.available() is None:
            assert prove(backend).exact, backend.name


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("quantize", [_noop, _zeros, _stale, _stale_patched],
                         ids=["empty", "zeros", "stale", "stale-patched"])
def test_noop_backend_is_refused_as_untouched(quantize, exact):
    with pytest.raises(BackendRefused, match="outputs left untouched: backend did not write its output buffers"):
        prove(_backend("noop", quantize, exact=exact))


def test_one_bit_off_is_refused_naming_the_byte():
    with pytest.raises(BackendRefused,
                       match=r"packed codes differ .* at 1 of 8192 .*row 5, column 9.*'normal/float16'"):
        prove(_backend("bitflip", _one_bit_off))


def test_wrong_scale_is_refused():
    with pytest.raises(BackendRefused, match=r"block scales differ .*row 128, column 1"):
        prove(_backend("scale", _scale_off))


def test_wrong_output_contract_is_refused():
    with pytest.raises(BackendRefused, match="packed output is"):
        prove(_backend("shape", lambda w, s: (reference.quantize(w, s)[0][:, :-1], reference.quantize(w, s)[1])))


def test_exceptions_are_refusals():
    def boom(w, ws2):
        raise RuntimeError("kernel exploded")

    with pytest.raises(BackendRefused, match="raised RuntimeError: kernel exploded"):
        prove(_backend("boom", boom))


@pytest.mark.parametrize("quantize", [_approx, _nudged(0.001, 0.2)], ids=["reciprocal", "nudged-rarely"])
def test_approximate_backend_within_tolerance_is_accepted(quantize):
    proof = prove(_backend("approx", quantize, exact=False))
    assert not proof.exact


def test_the_same_approximation_is_refused_when_declared_exact():
    with pytest.raises(BackendRefused, match="differ from the reference"):
        prove(_backend("approx", _nudged(0.001, 0.2), exact=True))


@pytest.mark.parametrize(
    "quantize,message",
    [(_nudged(0.005, 1.0), r"E2M1 codes one step off at \d+ of \d+ \(3\.\d+%; tolerance 0\.5%\)"),
     (_scales_two_steps, "more than one E4M3 step")],
    ids=["nudged-often", "scale-two-steps"],
)
def test_approximate_backend_outside_tolerance_is_refused(quantize, message):
    with pytest.raises(BackendRefused, match=message):
        prove(_backend("approx", quantize, exact=False))


# ---------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend to run on a GPU of the given capability with the given optional packages importable."""

    def setup(capability, *, packages=("flashinfer", "cutlass", "triton")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(flashinfer_backends, "_importable", lambda name: name in packages)
        monkeypatch.setattr(triton_kernel, "triton", object() if "triton" in packages else None)

    return setup


@pytest.mark.parametrize(
    "capability,packages,expected",
    [
        ((10, 0), ("flashinfer", "cutlass", "triton"), "flashinfer-cute-dsl"),
        ((10, 0), ("flashinfer", "triton"), "flashinfer-cuda"),
        ((12, 0), ("flashinfer",), "flashinfer-cuda"),
        ((9, 0), ("flashinfer", "cutlass", "triton"), "triton"),
        ((8, 0), ("triton",), "triton"),
    ],
)
def test_auto_selection_by_capability(fake_gpu, capability, packages, expected):
    fake_gpu(capability, packages=packages)
    assert _first_available().name == expected


def test_sm90_explains_why_flashinfer_is_skipped(fake_gpu):
    fake_gpu((9, 0))
    assert _first_available().name == "triton"
    why_not = dict((b.name, why) for b, why in kernels.candidates())["flashinfer-cuda"]
    assert "needs SM100+" in why_not and "silent no-op" in why_not


@pytest.mark.parametrize("capability,packages", [(None, ("flashinfer", "cutlass", "triton")), ((7, 5), ("triton",))])
def test_no_usable_gpu_falls_back_to_cpu(fake_gpu, capability, packages):
    fake_gpu(capability, packages=packages)
    assert _first_available().device == "cpu"


def _first_available() -> Backend:
    """The backend automatic selection tries first (before proving it)."""
    return next(b for b, why_not in kernels.candidates() if why_not is None)


@pytest.fixture
def fake_registry(monkeypatch):
    """A registry of synthetic 'cuda' backends (computing on the CPU) on a machine that claims a GPU."""
    registry = {
        "reference": kernels.get_backend("reference"),
        "broken": _backend("broken", _noop, device="cuda", priority=300),
        "approx": _backend("approx", _approx, exact=False, device="cuda", priority=200),
        "bitflip": _backend("bitflip", _one_bit_off, device="cuda", priority=100),
    }
    monkeypatch.setattr(kernels, "_REGISTRY", registry)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return registry


def test_proven_selection_refuses_and_falls_back(fake_registry):
    backend, reason = select_proven_backend()
    assert backend.name == "approx"
    assert "within tolerance" in reason
    assert "backend 'broken' refused: outputs left untouched" in reason


def test_exact_selection_skips_approximate_and_refuses_broken(fake_registry):
    backend, reason = select_proven_backend(exact=True)
    assert backend.name == "reference"
    assert "approx: approximate (--exact)" in reason
    assert "backend 'bitflip' refused: packed codes differ" in reason


def test_explicit_choice_must_pass(fake_registry):
    with pytest.raises(BackendRefused, match="outputs left untouched"):
        select_proven_backend("broken")
    with pytest.raises(RuntimeError, match="approximate; --exact"):
        select_proven_backend("approx", exact=True)
    backend, reason = select_proven_backend("approx")
    assert backend.name == "approx" and reason.startswith("chosen with --backend")


def test_device_restriction(fake_registry):
    backend, _ = select_proven_backend(device="cpu")
    assert backend.name == "reference"
