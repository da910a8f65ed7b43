"""Fused 3-D expert tensors, as transformers 5 saves some MoE models: which layouts convert, and how.

Llama-4 keeps its experts as batched matrices in ``[E, in, out]`` layout (``feed_forward.experts.gate_up_proj
[E, H, 2I]``, ``down_proj [E, I, H]``). ModelOpt 0.47 exports them 3-D, under the same names: each expert's
Linear weight is the transpose, quantized in blocks of 16 along its input dimension, and written back
transposed: ``<name>`` U8 ``[E, in/2, out]``, ``<name>_weight_scale`` F8_E4M3 ``[E, in/16, out]``, and one
``<name>_weight_scale_2`` and ``<name>_input_scale`` (0-dim F32) for all experts of the tensor.

Other fused layouts (``[E, out, in]``) have no exporter contract to follow: they are refused, never
quantized along a guessed axis.
"""

from __future__ import annotations

import re

from .errors import ConvertError
from .safetensors_io import FLOAT_DTYPES, OutTensor

STACKED = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
IN_OUT_MODEL_TYPES = ("llama4", "llama4_text")  # batched [E, in, out] experts
SUFFIXES = ("_weight_scale", "_weight_scale_2", "_input_scale")
BLOCK = 16


def stacked_experts(tensors: dict) -> list[str]:
    """The fused 3-D expert tensors of the source."""
    return [n for n, t in tensors.items() if len(t.info.shape) == 3 and STACKED.search(n)]


def check_convertible(config: dict, name: str, info, *, where: str) -> None:
    """Refuse a fused expert tensor that would be quantized but has no known export layout or shape."""
    model_type = config.get("model_type")
    if model_type not in IN_OUT_MODEL_TYPES:
        raise ConvertError(f"fused 3-D expert tensors ({name} {list(info.shape)}) of model_type {model_type!r} "
                           "have no known NVFP4 export layout", where=where,
                           fix="Save the model with one Linear per expert (transformers' save_pretrained does for "
                               "most architectures), convert the original Hub checkpoint, or --exclude them")
    if info.dtype not in FLOAT_DTYPES or info.shape[1] % BLOCK:
        raise ConvertError(f"fused expert tensor {name} is {info.dtype}{list(info.shape)}: NVFP4 needs a float "
                           f"tensor whose input dimension (axis 1) is a multiple of {BLOCK}", where=where,
                           fix="Convert from a BF16/FP16 checkpoint, or --exclude this module")


def outputs(name: str, shape: tuple[int, ...], weight_only: bool) -> tuple[OutTensor, ...]:
    experts, k, n = shape
    outs = [OutTensor(name, "U8", (experts, k // 2, n)), OutTensor(f"{name}_weight_scale", "F8_E4M3",
            (experts, k // BLOCK, n)), OutTensor(f"{name}_weight_scale_2", "F32", ())]
    if not weight_only:
        outs.append(OutTensor(f"{name}_input_scale", "F32", ()))
    return tuple(outs)
