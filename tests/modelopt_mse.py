"""ModelOpt 0.47's NVFP4 MSE weight export, run on the CPU: the oracle for ``--scales mse``.

ModelOpt's MSE calibration on a GPU takes its fused sweep kernel (``nvfp4_fp8_sweep._fp8_scale_sweep_kernel``):
every block tries all 126 E4M3 scales and keeps the first with the least squared error. Here that same Triton
source runs under Triton's interpreter, which must be switched on before Triton is first imported, so the
oracle runs in a child process (:func:`modelopt_mse`). The candidates and the static-quantizer export run
under :class:`CudaScalarDivision` (on a GPU a division by a Python number is a multiplication by its
reciprocal), and ``NVFP4QTensor.quantize`` writes the codes, all ModelOpt's own code.

As a script: ``python tests/modelopt_mse.py IN.pt OUT.pt`` with ``IN.pt`` a list of ``(weight, amax)``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def modelopt_mse(jobs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, ...]]:
    """``[(weight [R, K], global amax)] -> [(packed, scales as uint8, weight_scale_2)]`` as ModelOpt exports them."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        torch.save(jobs, src)
        env = dict(os.environ, TRITON_INTERPRET="1")
        done = subprocess.run([sys.executable, __file__, str(src), str(dst)], env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return torch.load(dst)


def _export(weight: torch.Tensor, amax: torch.Tensor):
    import triton
    from modelopt.torch.kernels.quantization.gemm import nvfp4_fp8_sweep as sweep
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    from cuda_division import CudaScalarDivision

    class StaticQuantizer:  # what ModelOpt's static export reads from a calibrated weight quantizer
        def __init__(self, block_amax, global_amax):
            self._amax, self.global_amax, self.block_sizes = block_amax, global_amax, {-1: 16}

    n = weight.numel() // 16
    with CudaScalarDivision():
        cands = sweep.fp8_scale_candidates("cpu").float()
    best = torch.empty(n, dtype=torch.float32)
    per_program = min(4096, 1 << max(4, (n - 1).bit_length()))
    sweep._fp8_scale_sweep_kernel.fn[(triton.cdiv(n, per_program),)](
        weight.contiguous().view(-1), cands, amax.float().reshape(1), best, n, BLOCK_SIZE=16,
        NUM_CANDIDATES=cands.numel(), BLOCKS_PER_PROGRAM=per_program)
    with CudaScalarDivision():
        quantizer = StaticQuantizer(best, amax.float())
        scales, ws2 = NVFP4QTensor.get_weights_scaling_factor_from_quantizer(quantizer, weight)
        qtensor, _, _ = NVFP4QTensor.quantize(weight, 16, scales, ws2)
    return qtensor._quantized_data, scales.view(torch.uint8), ws2.float().reshape(())


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    assert os.environ.get("TRITON_INTERPRET") == "1"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    torch.save([_export(w, a) for w, a in torch.load(sys.argv[1])], sys.argv[2])
