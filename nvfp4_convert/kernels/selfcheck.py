"""Prove a backend against the reference before it quantizes anything.

:func:`prove` runs a fixed probe set (random normal and heavy-tailed weights, exact E2M1 rounding ties,
zero blocks, tiny blocks that hit the 2^-9 scale clamp, block scales across the E4M3 subnormals, huge
values, saturating scales, odd row counts; bfloat16, float16 and float32) through a backend and compares
with :mod:`.reference`. CUDA backends also get a few larger tensors that span many tiles.

* Exact backends must match byte for byte.
* Approximate backends (``Backend.exact == False``) must stay within a documented tolerance: every block
  scale within one E4M3 step of the reference's and at most :data:`SCALE_STEP_FRACTION` of the blocks
  off by that step; in blocks with equal scales every element within one step of the E2M1 grid and at
  most :data:`CODE_STEP_FRACTION` of all elements off by that step; on each probe a dequantized RMS error
  at most :data:`RMS_RATIO` times the reference's.

A backend that fails raises :class:`BackendRefused`, naming what differed. Outputs that do not depend on
the input (constant bytes, or bytes that change between two calls on the same input while the allocator
holds different garbage) are reported as "outputs left untouched".
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch

from ..constants import E2M1_BOUNDS, E2M1_GRID
from . import Backend, candidates, explicit_backend, reference, search
from .common import BLOCK, dequantize, global_scale, grid_position, unpack_codes

SCALE_STEP_FRACTION = 0.005
CODE_STEP_FRACTION = 0.005
RMS_RATIO = 1.01

_POISON = (0xA5, 0x5A)


class BackendRefused(RuntimeError):
    """A backend whose outputs disagree with the reference; ``backend`` names it."""

    def __init__(self, backend: str, what: str):
        self.backend = backend
        super().__init__(f"backend {backend!r} refused: {what}")


@dataclass(frozen=True)
class Probe:
    name: str
    weight: torch.Tensor  # [R, K] on the CPU
    ws2: torch.Tensor  # float32 0-dim


@dataclass(frozen=True)
class ProofResult:
    """What :func:`prove` established."""

    backend: str
    exact: bool  # bit-identical to the reference on every probe
    probes: int
    elements: int
    seconds: float

    def summary(self) -> str:
        how = "bit-exact" if self.exact else "within tolerance"
        return f"proven {how} on {self.probes} probes ({self.elements:,} elements, {self.seconds:.2f} s)"


# ---------------------------------------------------------------------------------------------------
# Probe set
# ---------------------------------------------------------------------------------------------------

_BOUNDARIES = E2M1_BOUNDS
_GRID = E2M1_GRID[:-1]  # 6.0 is listed on its own below


def _ties(dtype: torch.dtype) -> torch.Tensor:
    """Rows of three blocks whose scale is exactly 2^k (ws2 = 1): values land exactly on E2M1 boundaries,
    on grid points, and one ulp of ``dtype`` either side of each boundary."""
    eps = torch.finfo(dtype).eps
    ulp = [2.0 ** math.floor(math.log2(t)) * eps for t in _BOUNDARIES]
    on = [6.0, *_BOUNDARIES, *(-t for t in _BOUNDARIES), -0.0]
    grid = [-6.0, *_GRID, *(-g for g in _GRID[1:]), 6.0, -0.1]
    near = [6.0, *(t - u for t, u in zip(_BOUNDARIES, ulp)), *(-(t + u) for t, u in zip(_BOUNDARIES, ulp)), 1e-3]
    row = torch.tensor(on + grid + near, dtype=torch.float64)
    return torch.stack([row * 2.0**k for k in range(-3, 4)]).to(dtype)


ALL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _probe_set(large: bool, dtypes: tuple[torch.dtype, ...] = ALL_DTYPES) -> list[Probe]:
    g = torch.Generator().manual_seed(20240611)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    probes: list[Probe] = []

    def add(name, w, ws2=None):
        ws2 = global_scale(w.abs().amax().float()) if ws2 is None else torch.as_tensor(ws2, dtype=torch.float32)
        probes.append(Probe(f"{name}/{str(w.dtype).removeprefix('torch.')}", w.contiguous(), ws2))

    for dt in dtypes:
        tiny, huge, limit = (1e-5, 2e4, 6e4) if dt == torch.float16 else (1e-6, 1e30, 3e38)
        add("normal", (randn(64, 256) * 0.02).to(dt))
        add("heavy-tailed", (randn(48, 128) * torch.exp(1.5 * randn(48, 128))).clamp(-6e4, 6e4).to(dt))
        add("ties", _ties(dt), 1.0)
        add("ties-scaled", (_ties(torch.float32) * 2.0**-12).to(dt), 2.0**-12)
        w = randn(8, 64) * 0.5
        w[1] = 0.0  # zero row
        w[2, :16] = 0.0  # zero block
        w[3, 16:32] = randn(16) * tiny  # scale clamps to 2^-9
        w[4, 32:48] = -0.0  # negative zeros: code 0, scale 1
        w[5, 48:] = randn(16) * 1e-3  # values that round to (signed) zero
        add("zero-and-tiny", w.to(dt))
        w = randn(16, 64) * torch.logspace(-5.5, -4.0, 16)[:, None]
        w[0] = 1.0  # sets ws2; the other rows get block scales across the E4M3 subnormals
        add("subnormal-scales", w.to(dt))
        add("huge", (randn(16, 64) * huge).clamp(-limit, limit).to(dt))
        w = randn(16, 64).to(dt)
        add("saturating", w, global_scale(w.abs().amax().float()) / 4)
        for rows, k in ((1, 16), (3, 48), (129, 32)):
            add(f"rows{rows}", randn(rows, k).to(dt))
    add("all-zero", torch.zeros(4, 32, dtype=torch.bfloat16))
    if large:
        for dt, (rows, k, scale) in zip(ALL_DTYPES, ((512, 2048, 0.02), (129, 1040, 0.05), (64, 4096, 1.0))):
            if dt in dtypes:
                add("large", (randn(rows, k) * scale).to(dt))
    return probes


@functools.lru_cache(maxsize=4)
def _expected(large: bool, dtypes: tuple[torch.dtype, ...]) -> tuple[tuple[Probe, torch.Tensor, torch.Tensor], ...]:
    return tuple((p, *reference.quantize(p.weight, p.ws2)) for p in _probe_set(large, dtypes))


# ---------------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------------


def _where(p: Probe) -> str:
    rows, k = p.weight.shape
    return f"probe {p.name!r} [{rows}x{k}]"


def _first_diff(got: torch.Tensor, want: torch.Tensor) -> str:
    bad = (got != want).nonzero()
    r, c = bad[0].tolist()
    return (f"{len(bad)} of {want.numel()} (first at row {r}, column {c}: got 0x{int(got[r, c]):02x}, "
            f"want 0x{int(want[r, c]):02x})")


def _signed_grid(packed: torch.Tensor) -> torch.Tensor:
    """Packed codes -> signed position on the E2M1 grid (+0 and -0 both 0), one per element."""
    return grid_position(unpack_codes(packed))


def _rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item() if x.numel() else 0.0


def _poison(device: str, p: Probe, byte: int) -> None:
    """Leave ``byte`` in freed allocator blocks of the sizes the outputs will take, so that a backend
    returning buffers it never wrote returns recognisable bytes."""
    rows, k = p.weight.shape
    up = lambda x, m: (x + m - 1) // m * m  # noqa: E731
    sizes = {rows * k // 2, rows * k // BLOCK, up(rows, 16) * k // BLOCK, up(rows, 128) * up(k // BLOCK, 4)}
    try:
        bufs = [torch.full((n,), byte, dtype=torch.uint8, device=device) for n in sorted(sizes)]
        del bufs
    except (RuntimeError, AssertionError):  # e.g. no usable CUDA device: poisoning is best effort
        pass


def _call(backend: Backend, p: Probe, byte: int) -> tuple[torch.Tensor, torch.Tensor]:
    _poison(backend.device, p, byte)
    try:
        packed, scales = backend.quantize(p.weight, p.ws2)
    except Exception as exc:  # noqa: BLE001 - any failure refuses the backend
        raise BackendRefused(backend.name, f"raised {type(exc).__name__}: {exc} on {_where(p)}") from exc
    rows, k = p.weight.shape
    for name, t, shape, dtype in (("packed", packed, (rows, k // 2), torch.uint8),
                                  ("scales", scales, (rows, k // BLOCK), torch.float8_e4m3fn)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype or t.device.type != "cpu":
            got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise BackendRefused(backend.name,
                                 f"{name} output is {got}, expected {shape} {dtype} on the CPU ({_where(p)})")
    return packed, scales.view(torch.uint8)


def _untouched(backend: Backend, p: Probe, first: tuple[torch.Tensor, torch.Tensor],
               want_packed: torch.Tensor) -> str | None:
    """Why the outputs cannot have been computed from the input, or None.

    Garbage in unwritten buffers is constant (poisoned or zeroed memory), stays the same for a different
    input (stale memory; a wrapper may still patch a few blocks, so most bytes, not all, are compared), or
    changes between two calls on the same input (memory that other work, here a call in between on the
    negated input, has used meanwhile)."""
    same = lambda a, b: torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # noqa: E731
    packed, scales = first
    if packed.unique().numel() == 1 and scales.unique().numel() == 1 and want_packed.unique().numel() > 1:
        why = f"every output byte is 0x{int(packed[0, 0]):02x}/0x{int(scales[0, 0]):02x}"
    else:
        negated = Probe(p.name, -p.weight, p.ws2)
        other = _call(backend, negated, _POISON[1])
        flips = reference.quantize(negated.weight, p.ws2)[0] != want_packed  # sign bits a real kernel flips
        if flips.any() and (other[0][flips] == packed[flips]).float().mean() > 0.5:
            why = "the negated input gave the same codes"
        elif not same(_call(backend, p, _POISON[0]), first):
            why = "two calls on the same input returned different bytes"
        else:
            return None
    return f"outputs left untouched: backend did not write its output buffers ({why}; {_where(p)})"


@dataclass
class _Tally:
    blocks: int = 0
    scale_steps: int = 0
    elements: int = 0
    code_steps: int = 0


def _check_approx(p: Probe, packed, scales, want_packed, want_scales, tally: _Tally) -> str | None:
    """None when within tolerance on this probe, else what is off (the fractions are checked at the end)."""
    ds = (scales.to(torch.int16) - want_scales.to(torch.int16)).abs()
    if (ds > 1).any():
        return (f"block scales more than one E4M3 step from the reference at {_first_diff(scales, want_scales)} "
                f"on {_where(p)}")
    same = (ds == 0).repeat_interleave(BLOCK, dim=1)
    dc = (_signed_grid(packed) - _signed_grid(want_packed)).abs()
    if (dc[same] > 1).any():
        return (f"E2M1 codes more than one grid step from the reference at {_first_diff(packed, want_packed)} "
                f"on {_where(p)}")
    tally.blocks += ds.numel()
    tally.scale_steps += int((ds == 1).sum())
    tally.elements += dc.numel()
    tally.code_steps += int((dc[same] == 1).sum())
    w = p.weight.float()
    err = _rms(dequantize(packed, scales.view(torch.float8_e4m3fn), p.ws2) - w)
    ref_err = _rms(dequantize(want_packed, want_scales.view(torch.float8_e4m3fn), p.ws2) - w)
    limit = RMS_RATIO * ref_err + 1e-9 * _rms(w)
    if not err <= limit:  # also catches NaN
        return f"dequantized RMS error {err:.4g} exceeds {RMS_RATIO:g}x the reference's {ref_err:.4g} on {_where(p)}"
    return None


def channel_weights_for(p: Probe) -> torch.Tensor:
    """Deterministic, widely spread per-input-channel weights for a probe (the ``mse-weighted`` check)."""
    g = torch.Generator().manual_seed(p.weight.shape[1])
    return torch.exp(2.0 * torch.randn(p.weight.shape[1], generator=g)).float()


def _search_args(p: Probe, scales: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The global amax a search probe runs with (a fused partner's, larger, on some) and its weights."""
    amax = reference.amax(p.weight)
    if p.name.startswith(("normal", "rows3")):
        amax = amax * 1.7
    return amax, channel_weights_for(p) if scales == "mse-weighted" else None


def _search_probes(large: bool, dtypes: tuple[torch.dtype, ...]) -> list[Probe]:
    """The probe set without the tensors too large for the (slow) sweep reference; with ``large``, one
    tensor per dtype that spans many kernel programs instead."""
    probes = [p for p in _probe_set(False, dtypes) if not p.name.startswith("all-zero") and p.weight.numel() <= 16384]
    if large:
        g = torch.Generator().manual_seed(20240612)
        for dt, (rows, k) in zip(ALL_DTYPES, ((96, 2048), (129, 1040), (33, 4096))):
            if dt in dtypes:
                w = torch.randn(rows, k, generator=g) * torch.logspace(-2, 0, rows)[:, None]
                w[::7, :BLOCK] = 0.0  # zero blocks scattered over the programs
                probes.append(Probe(f"large/{str(dt).removeprefix('torch.')}", w.to(dt), torch.tensor(1.0)))
    return probes


@functools.lru_cache(maxsize=8)
def _expected_search(scales: str, dtypes: tuple[torch.dtype, ...], large: bool = False) -> tuple:
    out = []
    for p in _search_probes(large, dtypes):
        amax, h = _search_args(p, scales)
        out.append((p, amax, h, *search.quantize(p.weight, amax, h)))
    return tuple(out)


def prove_search(backend: Backend, scales: str, *, dtypes: tuple[torch.dtype, ...] | None = None,
                 large: bool | None = None) -> ProofResult:
    """Check ``backend.search`` bit for bit against :mod:`.search` on the probe set, in mode ``scales``
    (``large``: add tensors that span many kernel programs; default: for CUDA backends)."""
    start = time.perf_counter()
    if backend.search is None:
        raise BackendRefused(backend.name, f"has no {scales} block-scale search")
    large = backend.device == "cuda" if large is None else large
    expected = _expected_search(scales, tuple(d for d in ALL_DTYPES if d in (dtypes or ALL_DTYPES)), large)
    elements = 0
    for p, amax, h, want_packed, want_scales in expected:
        try:
            packed, scales_out = backend.search(p.weight, amax, h)
        except Exception as exc:  # any failure refuses the backend
            raise BackendRefused(backend.name,
                                 f"{scales} search raised {type(exc).__name__}: {exc} on {_where(p)}") from exc
        got, want = scales_out.view(torch.uint8), want_scales.view(torch.uint8)
        if not torch.equal(got, want):
            raise BackendRefused(backend.name, f"{scales} block scales differ from the reference at "
                                               f"{_first_diff(got, want)} on {_where(p)}")
        if not torch.equal(packed, want_packed):
            raise BackendRefused(backend.name, f"{scales} codes differ from the reference at "
                                               f"{_first_diff(packed, want_packed)} on {_where(p)}")
        elements += p.weight.numel()
    return ProofResult(backend.name, True, len(expected), elements, time.perf_counter() - start)


def prove(backend: Backend, *, large: bool | None = None, dtypes: tuple[torch.dtype, ...] | None = None) -> ProofResult:
    """Run the probe set through ``backend`` and compare with the reference.

    Args:
        backend: the backend to check; it is run even if ``available()`` says no (so that a backend that
            silently does nothing on this GPU can be shown to be refused).
        large: add larger tensors that span many kernel tiles; default: for CUDA backends.
        dtypes: the input dtypes to probe (the converter passes those of the weights it will quantize);
            default: bfloat16, float16 and float32.

    Returns:
        a :class:`ProofResult`. Raises :class:`BackendRefused` naming the first difference.
    """
    start = time.perf_counter()
    large = backend.device == "cuda" if large is None else large
    expected = _expected(large, tuple(d for d in ALL_DTYPES if d in (dtypes or ALL_DTYPES)))
    tally = _Tally()
    all_equal = True
    for p, want_packed, want_scales in expected:
        packed, scales = _call(backend, p, _POISON[0])
        want_scales = want_scales.view(torch.uint8)
        if torch.equal(packed, want_packed) and torch.equal(scales, want_scales):
            tally.blocks += scales.numel()
            tally.elements += packed.numel() * 2
            continue
        all_equal = False
        problem = _untouched(backend, p, (packed, scales), want_packed)
        if problem is None and backend.exact:
            if not torch.equal(scales, want_scales):
                problem = f"block scales differ from the reference at {_first_diff(scales, want_scales)} on {_where(p)}"
            else:
                problem = (f"packed codes differ from the reference at {_first_diff(packed, want_packed)} bytes "
                           f"on {_where(p)}")
        if problem is None:
            problem = _check_approx(p, packed, scales, want_packed, want_scales, tally)
        if problem:
            raise BackendRefused(backend.name, problem)
    for what, steps, total, limit in (
        ("block scales", tally.scale_steps, tally.blocks, SCALE_STEP_FRACTION),
        ("E2M1 codes", tally.code_steps, tally.elements, CODE_STEP_FRACTION),
    ):
        if steps > limit * total:
            raise BackendRefused(backend.name, f"{what} one step off at {steps} of {total} ({steps / total:.2%}; "
                                               f"tolerance {limit:.1%})")
    return ProofResult(backend.name, all_equal, len(expected), tally.elements, time.perf_counter() - start)


def _prove_all(backend: Backend, dtypes, scales: str) -> ProofResult:
    proof = prove(backend, dtypes=dtypes)
    if scales != "rtn":
        prove_search(backend, scales, dtypes=dtypes)
    return proof


def select_proven_backend(name: str | None = None, *, device: str | None = None, exact: bool = False,
                          dtypes: tuple[torch.dtype, ...] | None = None, scales: str = "rtn") -> tuple[Backend, str]:
    """Choose the fastest available backend that passes :func:`prove` (see :func:`..kernels.candidates`).

    Args:
        name: an explicit choice (``--backend``): it must be available, pass, and be exact if ``exact``;
            otherwise this raises (``KeyError`` for an unknown name, ``RuntimeError``/:class:`BackendRefused`).
        device: restrict automatic choice to ``"cpu"`` or ``"cuda"``.
        exact: accept bit-exact backends only (``--exact``).
        dtypes: input dtypes the backend must handle (see :func:`prove`).
        scales: block-scale mode; for ``mse``/``mse-weighted`` the backend's search must also pass
            :func:`prove_search`.

    Returns:
        ``(backend, reason)``; the reason says why it was chosen, how it was proven, and which faster
        backends were skipped or refused.
    """
    if name is not None:
        backend = explicit_backend(name)
        if exact and not backend.exact:
            raise RuntimeError(f"backend {name!r} is approximate; --exact needs a bit-exact backend")
        return backend, f"chosen with --backend; {_prove_all(backend, dtypes, scales).summary()}"
    notes = []
    for backend, why_not in candidates(device):
        if why_not is None and exact and not backend.exact:
            why_not = "approximate (--exact)"
        if why_not:
            notes.append(f"{backend.name}: {why_not}")
            continue
        if scales != "rtn" and backend.search is None:
            notes.append(f"{backend.name}: no {scales} search")
            continue
        try:
            proof = _prove_all(backend, dtypes, scales)
        except BackendRefused as exc:
            notes.append(str(exc))
            continue
        reason = f"fastest available; {proof.summary()}"
        return backend, reason + (f" (skipped: {'; '.join(notes)})" if notes else "")
    raise RuntimeError("no backend passed the self-check: " + "; ".join(notes))
