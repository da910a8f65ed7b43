"""FlashInfer NVFP4 quantize kernels (``fp4_quantize``, CUDA and CuTe-DSL), Blackwell (SM100+) only.

Both use an approximate reciprocal, so they are not bit-exact with ModelOpt (``exact=False``); the self-check
holds them to a tolerance. Conventions handled here:

* FlashInfer's ``global_scale`` is ``448 * 6 / amax``, the reciprocal of ModelOpt's ``weight_scale_2``.
* Scales are requested in the linear ``[R, K/16]`` layout (``is_sf_swizzled_layout=False``).
* FlashInfer writes scale 0 for an all-zero block (ModelOpt: 1.0) and does not clamp tiny scales to 2^-9;
  such blocks are re-quantized with the reference so the checkpoint matches ModelOpt's format.
* Its kernels take 16-bit inputs only; float32 weights go through the reference on the GPU.

On SM90 ``fp4_quantize(backend="cuda")`` compiles to an empty kernel and returns untouched buffers without an
error, hence the capability check in ``available``.
"""

from __future__ import annotations

import importlib.util
import inspect
from functools import partial

import torch

from . import Backend, reference
from .common import BLOCK


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _why_not(*, cute_dsl: bool) -> str | None:
    if not _importable("flashinfer"):
        return "flashinfer is not installed"
    if cute_dsl and not _importable("cutlass"):
        return "nvidia-cutlass-dsl is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if major < 10:
        return (f"needs SM100+ (Blackwell); this GPU is SM{major}{minor}, where FlashInfer's FP4 quantize is a "
                "silent no-op")
    return None


def _fix_unscaled_blocks(weight: torch.Tensor, ws2: torch.Tensor, packed: torch.Tensor,
                         scales_u8: torch.Tensor) -> None:
    """Re-quantize, in place, the blocks to which FlashInfer gave scale 0 (all-zero or tiny blocks)."""
    rows, cols = (scales_u8 == 0).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return
    blocks = weight.view(weight.shape[0], -1, BLOCK)[rows, cols]
    p, s = reference.quantize(blocks, ws2)
    packed.view(packed.shape[0], -1, BLOCK // 2)[rows, cols] = p
    scales_u8[rows, cols] = s.view(torch.uint8)[:, 0]


def _quantize(weight: torch.Tensor, ws2: torch.Tensor, *, backend: str,
              to_host: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    import flashinfer

    w = (weight if weight.is_cuda else weight.to("cuda")).contiguous()
    ws2 = ws2.to(device=w.device, dtype=torch.float32)
    rows, k = w.shape
    if w.dtype not in (torch.bfloat16, torch.float16):
        packed, scales = reference.quantize(w, ws2)
        return (packed.cpu(), scales.cpu()) if to_host else (packed, scales)
    kwargs = {}
    if "nvfp4_4over6" in inspect.signature(flashinfer.fp4_quantize).parameters:
        kwargs["nvfp4_4over6"] = None  # plain NVFP4; ignore FLASHINFER_NVFP4_4OVER6* in the environment
    packed, sf = flashinfer.fp4_quantize(
        w, torch.reciprocal(ws2).reshape(1), sf_vec_size=16, sf_use_ue8m0=False,
        is_sf_swizzled_layout=False, backend=backend, **kwargs,
    )
    packed = packed.view(torch.uint8).reshape(rows, k // 2)
    scales = sf.view(torch.uint8).reshape(-1)[: rows * (k // BLOCK)].reshape(rows, k // BLOCK).clone()
    _fix_unscaled_blocks(w, ws2, packed, scales)
    scales = scales.view(torch.float8_e4m3fn)
    return (packed.cpu(), scales.cpu()) if to_host else (packed, scales)


def quantize_cuda(weight: torch.Tensor, ws2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``flashinfer.fp4_quantize(backend="cuda")``, linear scales; outputs on the CPU."""
    return _quantize(weight, ws2, backend="cuda")


def quantize_cute_dsl(weight: torch.Tensor, ws2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``flashinfer.fp4_quantize(backend="cute-dsl")``, linear scales; outputs on the CPU."""
    return _quantize(weight, ws2, backend="cute-dsl")


def amax(weight: torch.Tensor) -> torch.Tensor:
    """max|weight| computed on the GPU, as a float32 0-dim GPU tensor."""
    w = weight if weight.is_cuda else weight.to("cuda")
    return reference.amax(w)


def available_cuda() -> str | None:
    return _why_not(cute_dsl=False)


def available_cute_dsl() -> str | None:
    return _why_not(cute_dsl=True)


BACKENDS = (
    Backend(
        name="flashinfer-cute-dsl",
        quantize=quantize_cute_dsl,
        amax=amax,
        exact=False,
        device="cuda",
        available=available_cute_dsl,
        priority=300,
        description="FlashInfer CuTe-DSL fp4_quantize; Blackwell (SM100+); approximate reciprocal",
        quantize_device=partial(_quantize, backend="cute-dsl", to_host=False),
    ),
    Backend(
        name="flashinfer-cuda",
        quantize=quantize_cuda,
        amax=amax,
        exact=False,
        device="cuda",
        available=available_cuda,
        priority=200,
        description="FlashInfer CUDA fp4_quantize; Blackwell (SM100+); approximate reciprocal",
        quantize_device=partial(_quantize, backend="cuda", to_host=False),
    ),
)
