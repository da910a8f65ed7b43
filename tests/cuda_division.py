"""Run torch code on the CPU with division by a Python number done the way PyTorch does it on CUDA.

ModelOpt's exports run on a GPU. There ``tensor / 2688.0`` does not divide: PyTorch's CUDA kernel
(aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu, ``div_true_kernel_cuda``) sees a CPU-scalar divisor,
computes ``inv_b = opmath_t(1.0) / b`` once on the host and launches ``a * inv_b``. On the CPU the same
expression is a correctly rounded quotient, one ulp away for about a quarter of all values. Inside
:class:`CudaScalarDivision` every division of a floating tensor by a Python number is replaced by exactly
that multiplication (the reciprocal and the product in ``opmath_t``: float32 for 16- and 32-bit floats), so
ModelOpt's own code, run on the CPU, produces the numbers it produces on a GPU.

Only Python-number divisors are rewritten. In a GPU run every tensor ModelOpt divides by (per-block amax,
``6 * weight_scale_2``) lives on the GPU and takes the true-division kernel, as it does here.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_DIVISIONS = {torch.div, torch.divide, torch.true_divide, torch.Tensor.div, torch.Tensor.divide,
              torch.Tensor.true_divide, torch.Tensor.__truediv__}
_IN_PLACE = {torch.Tensor.div_, torch.Tensor.divide_, torch.Tensor.true_divide_, torch.Tensor.__itruediv__}


def cuda_scalar_divide(a: torch.Tensor, b: float) -> torch.Tensor:
    """``a / b`` as CUDA computes it for a Python-number ``b``: ``a * (1 / b)``, each step in opmath."""
    out_dtype = torch.result_type(a, b)
    opmath = torch.float64 if out_dtype == torch.float64 else torch.float32
    inv_b = torch.tensor(1.0, dtype=opmath) / torch.tensor(b, dtype=opmath)
    return (a.to(opmath) * inv_b).to(out_dtype)


class CudaScalarDivision(TorchFunctionMode):
    """Torch-function mode that rewrites ``tensor / number`` as CUDA does; ``count`` says how many it saw."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _DIVISIONS or func in _IN_PLACE) and len(args) == 2 and kwargs.get("rounding_mode") is None:
            a, b = args
            if (isinstance(a, torch.Tensor) and isinstance(b, (int, float)) and not isinstance(b, bool)
                    and torch.result_type(a, b).is_floating_point and "out" not in kwargs):
                self.count += 1
                result = cuda_scalar_divide(a, b)
                return a.copy_(result) if func in _IN_PLACE else result
        return func(*args, **kwargs)
