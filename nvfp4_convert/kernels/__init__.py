"""Kernel registry: every NVFP4 quantize backend behind one small interface.

A backend quantizes row chunks of a 2-D weight against a given float32 global scale and returns the
packed codes and linear-layout block scales. ``reference`` is always present. The built-in faster ones
(``cpu``, ``triton``, ``flashinfer-*``) each define ``BACKENDS`` in their module; those modules are
imported, and their backends registered, the first time the registry is consulted, so importing this
package loads neither numba nor triton. Other code may :func:`register` backends of its own. The
converter proves a backend before using it (:func:`.selfcheck.select_proven_backend`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from . import reference, search

QuantizeFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
AmaxFn = Callable[[torch.Tensor], torch.Tensor]
SearchFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Backend:
    """One quantize implementation.

    Attributes:
        name: what ``--backend`` calls it.
        quantize: ``(weight [R, K], ws2 float32 0-dim) -> (packed uint8 [R, K/2], scales fp8 [R, K/16])``;
            outputs are on the CPU.
        amax: ``weight -> max|weight|`` as a float32 0-dim tensor on the weight's device.
        exact: whether it is bit-exact with the reference (approximate kernels are checked against a
            tolerance instead).
        device: ``"cpu"`` or ``"cuda"``: where it computes.
        available: returns ``None`` when usable here, else the reason it is not.
        priority: higher wins in automatic selection among available backends of the same device.
        set_threads: sets how many CPU threads it uses (``--threads``), for backends that have a say.
        quantize_device: like ``quantize`` but leaves the outputs on the GPU (CUDA backends).
        search: the ``mse``/``mse-weighted`` block-scale search (see :mod:`.search`):
            ``(weight [R, K], global amax, channel weights [K] or None) -> (packed, scales)`` on the CPU,
            the weight on the CPU or (as the converter loads it for CUDA backends) the GPU; None when the
            backend has none.
    """

    name: str
    quantize: QuantizeFn
    amax: AmaxFn
    exact: bool = True
    device: str = "cpu"
    available: Callable[[], str | None] = field(default=lambda: None)
    priority: int = 0
    description: str = ""
    set_threads: Callable[[int], None] | None = None
    quantize_device: QuantizeFn | None = None
    search: SearchFn | None = None


_REGISTRY: dict[str, Backend] = {}
_BUILTIN_MODULES = ("cpu", "triton_kernel", "flashinfer_backends")
_builtins_loaded = False


def _registry() -> dict[str, Backend]:
    """The registry, with the built-in backends registered on first use."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in _BUILTIN_MODULES:
            for backend in importlib.import_module(f".{module}", __name__).BACKENDS:
                _REGISTRY.setdefault(backend.name, backend)
    return _REGISTRY


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend under its name."""
    _registry()[backend.name] = backend
    return backend


def backends() -> dict[str, Backend]:
    """All registered backends, by name."""
    return dict(_registry())


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises ``KeyError`` listing the known names."""
    try:
        return _registry()[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r}; known: {', '.join(sorted(_registry()))}") from None


def explicit_backend(name: str) -> Backend:
    """The backend called ``name`` if it can run here; raises ``KeyError``/``RuntimeError`` otherwise."""
    backend = get_backend(name)
    why_not = backend.available()
    if why_not:
        raise RuntimeError(f"backend {name!r} cannot run here: {why_not}")
    return backend


def candidates(device: str | None = None) -> Iterator[tuple[Backend, str | None]]:
    """Backends in automatic-selection order, each with the reason it cannot run here (None if it can).

    CUDA backends come first when a GPU is present, then CPU ones; higher priority first within each.
    """
    devices = [device] if device else (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    for dev in devices:
        for backend in sorted((b for b in _registry().values() if b.device == dev), key=lambda b: -b.priority):
            yield backend, backend.available()


_REGISTRY["reference"] = Backend(
    name="reference",
    quantize=reference.quantize,
    amax=reference.amax,
    exact=True,
    device="cpu",
    priority=-100,
    description="pure torch, bit-exact with ModelOpt 0.47; slow but runs anywhere",
    search=search.quantize,
)
