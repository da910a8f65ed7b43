"""Random weights for comparing our backends with ModelOpt's own ``NVFP4QTensor.quantize``.

``cases()`` gives the same tensors on every machine: mixed dtypes and shapes, ties on every E2M1
boundary, zero and negative-zero blocks, blocks whose scale clamps to 2^-9 or falls among the E4M3
subnormals, and tensors with tiny and huge global scales. All-zero tensors are left out: ModelOpt writes
``weight_scale_2 = 0`` and NaN block scales for them, where we write 1.0 (tested elsewhere).

Run as a script on a GPU machine to save ModelOpt's CUDA results for ``tests/test_gpu.py``::

    python tests/oracle_cases.py OUT.pt [DEVICE]
"""

from __future__ import annotations

import sys

import torch

BLOCK = 16
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KINDS = ("normal", "heavy", "ties", "zero-blocks", "tiny-blocks", "huge", "tiny")
BOUNDARIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _ties(g: torch.Generator, rows: int, nblk: int, dtype: torch.dtype) -> torch.Tensor:
    # amax = 2688 * 2^e makes weight_scale_2 exactly 2^e (both arithmetics); a block of amax 6 * 2^(k+e) has
    # scale 2^k, so its elements divide exactly to the E2M1 boundaries they were built from
    low, high = (-6, 4) if dtype == torch.float16 else (-40, 40)
    e = int(torch.randint(low, high, (), generator=g))
    k = torch.randint(-6 if dtype == torch.float16 else -9, 1, (rows, nblk, 1), generator=g).double()
    picks = torch.tensor((*BOUNDARIES, 0.0, 0.5, 1.0, 6.0), dtype=torch.float64)
    idx = torch.randint(0, len(picks), (rows, nblk, BLOCK), generator=g)
    sign = torch.where(torch.rand(rows, nblk, BLOCK, generator=g) < 0.5, -1.0, 1.0).double()
    blocks = picks[idx] * sign
    blocks[..., 0] = 6.0  # every block reaches its amax
    w = (blocks * 2.0 ** (k + e)).view(rows, -1)
    w[0, 0] = 2688 * 2.0**e
    return w.to(dtype)


def _case(i: int) -> tuple[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    dtype = DTYPES[i % len(DTYPES)]
    kind = KINDS[(i // len(DTYPES)) % len(KINDS)]
    rows = int(torch.randint(1, 48, (), generator=g))
    nblk = int(torch.randint(1, 24, (), generator=g))
    fp16 = dtype == torch.float16
    w = torch.randn(rows, nblk * BLOCK, generator=g, dtype=torch.float64)
    if kind == "normal":
        w *= 10.0 ** float(torch.empty(()).uniform_(-3, 2, generator=g))
    elif kind == "heavy":
        w *= torch.exp(1.5 * torch.randn(w.shape, generator=g, dtype=torch.float64))
    elif kind == "ties":
        return f"{i}-{kind}", _ties(g, rows, nblk, dtype)
    elif kind == "zero-blocks":
        blocks = w.view(rows, nblk, BLOCK)
        blocks[torch.rand(rows, nblk, generator=g) < 0.3] = 0.0
        blocks[torch.rand(rows, nblk, generator=g) < 0.1] = -0.0
        w.view(-1)[0] = 1.0
    elif kind == "tiny-blocks":  # block scales below 2^-9 (clamped) and among the E4M3 subnormals
        blocks = w.view(rows, nblk, BLOCK)
        exponents = torch.empty(rows, nblk, 1, dtype=torch.float64).uniform_(-7 if not fp16 else -4, 0, generator=g)
        blocks *= 10.0**exponents
        w.view(-1)[0] = 1.0
    elif kind == "huge":
        w *= 1e4 if fp16 else 10.0 ** float(torch.empty(()).uniform_(20, 36, generator=g))
    elif kind == "tiny":
        w *= 1e-3 if fp16 else 10.0 ** float(torch.empty(()).uniform_(-30, -20, generator=g))
    limit = 6e4 if fp16 else 3e38
    return f"{i}-{kind}", w.clamp(-limit, limit).to(dtype)


def cases(n: int = 240) -> list[tuple[str, torch.Tensor]]:
    """``n`` named weights ``[R, K]`` (K a multiple of 16), the same on every machine."""
    return [_case(i) for i in range(n)]


def modelopt_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ModelOpt 0.47's NVFP4 export arithmetic on ``weight``'s device: ``(packed, scales as uint8, ws2)``."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    qtensor, scales, ws2 = NVFP4QTensor.quantize(weight, BLOCK)
    return qtensor._quantized_data, scales.view(torch.uint8), ws2.float().reshape(())


_PARTS = ("packed", "scales", "ws2")


def save_results(results: dict, path: str, *, device: str) -> None:
    """``{name: (packed, scales, ws2)}`` as one safetensors file."""
    from safetensors.torch import save_file

    flat = {f"{name}/{part}": t.contiguous() for name, ts in results.items() for part, t in zip(_PARTS, ts)}
    save_file(flat, path, metadata={"device": device, "torch": str(torch.__version__)})


def load_results(path: str) -> dict:
    """Inverse of :func:`save_results`."""
    from safetensors.torch import load_file

    flat = load_file(path)
    names = {key.rpartition("/")[0] for key in flat}
    return {name: tuple(flat[f"{name}/{part}"] for part in _PARTS) for name in names}


if __name__ == "__main__":
    device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
    results = {}
    for name, w in cases():
        packed, scales, ws2 = modelopt_quantize(w.to(device))
        results[name] = (packed.cpu(), scales.cpu(), ws2.cpu())
    where = torch.cuda.get_device_name() if device == "cuda" else device
    save_results(results, sys.argv[1], device=where)
    print(f"saved ModelOpt results ({where}, torch {torch.__version__}) for {len(results)} tensors to {sys.argv[1]}")
