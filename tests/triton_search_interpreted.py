"""The Triton block-scale search run by Triton's interpreter on the CPU (``TRITON_INTERPRET=1``).

The interpreter must be switched on before Triton is first imported, so the kernel runs in a child process
(:func:`interpreted_search`). As a script: ``python tests/triton_search_interpreted.py IN.pt OUT.pt`` with
``IN.pt`` a list of ``(weight, amax, channel_weights or None)``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def hard_blocks(rows: int, dtype: torch.dtype, magnitude: float, seed: int) -> torch.Tensor:
    """``[rows + 12, 48]`` of blocks a search gets wrong first: exact E2M1 ties at power-of-two scales,
    zero and -0.0 blocks, blocks 10^-6 below the rest (the 2^-9 scale clamp), one-value and constant blocks
    (candidates tied on the loss), heavy tails; then ``rows`` rows of normal values; times ``magnitude``."""
    from nvfp4_convert.kernels.selfcheck import _ties

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows + 12, 48, generator=g, dtype=torch.float64)
    w[:7] = _ties(torch.float32).double()
    w[7] = 0.0
    w[8, :16], w[8, 16:32], w[8, 32:] = -0.0, w[8, 16:32] * 1e-6, 0.0
    w[8, 40] = 3.0
    w[9, :16], w[9, 16:32] = 1.0, 0.75
    w[10] *= torch.exp(2 * torch.randn(48, generator=g, dtype=torch.float64))
    w[11] = torch.randint(-12, 13, (48,), generator=g) * 0.5
    return (w * magnitude).to(dtype)


def spread_weights(k: int, seed: int) -> torch.Tensor:
    """Per-input-channel weights over many decades, with a zero."""
    g = torch.Generator().manual_seed(seed)
    h = torch.exp(3 * torch.randn(k, generator=g))
    h[5] = 0.0
    return h


def search_jobs(rows: int, magnitudes: tuple[float, float] = (1e-12, 1e15)
                ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``(weight, global amax, channel weights)`` over the dtypes, magnitudes (block scales from the E4M3
    subnormals to 448, global scales from ``magnitudes``), both modes and fused partners' larger amax.

    Global scales beyond about 1e-15 .. 1e17 make every loss underflow to 0 or overflow to inf, so that
    nothing prunes and every candidate is visited: right, and slow under the interpreter."""
    jobs = []
    for i, (dtype, magnitude, partner, weighted) in enumerate((
            (torch.bfloat16, 1.0, 1.0, False), (torch.bfloat16, magnitudes[1], 1.7, True),
            (torch.float16, 0.01, 1.0, True), (torch.float32, magnitudes[0], 1.3, False))):
        w = hard_blocks(rows, dtype, magnitude, seed=i)
        amax = w.abs().amax().float() * partner
        jobs.append((w, amax, spread_weights(w.shape[1], seed=i) if weighted else None))
    return jobs


def interpreted_search(jobs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(weight, global amax, channel weights)] -> [(packed, scales as uint8)]`` from the Triton kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        torch.save(jobs, src)
        env = dict(os.environ, TRITON_INTERPRET="1")
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        done = subprocess.run([sys.executable, __file__, str(src), str(dst)], env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return torch.load(dst)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from nvfp4_convert.kernels import triton_kernel

    out = []
    for weight, amax, h in torch.load(sys.argv[1]):
        packed, scales = triton_kernel.search_on_device(weight, amax, h)
        out.append((packed, scales.view(torch.uint8)))
    torch.save(out, sys.argv[2])
