"""FP8 sources: which flavours convert, where each weight's scale is, and how a weight dequantizes.

A weight is dequantized the way NVIDIA's DeepSeek NVFP4 pipeline does it (DeepSeek's ``weight_dequant``
under a BF16 default dtype): each E4M3 value times its block's scale in float32, rounded once to
BF16. The NVFP4 quantizer then sees exactly the BF16 weights that pipeline quantizes, and modules kept
in high precision are written as that same BF16.

Flavours converted: ``quant_method: "fp8"`` with ``weight_block_size`` (DeepSeek-V3/R1, Kimi-K2,
Qwen3-FP8, GLM-4.5-FP8: ``<module>.weight_scale_inv`` per block), ``"fp8"`` without a block size
(one scale per tensor) and ModelOpt FP8 (``quant_algo: "FP8"``, ``<module>.weight_scale`` per tensor).
The source's activation and KV-cache scales do not apply to NVFP4 output and are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConvertError

SCALE_DTYPES = ("F32", "BF16", "F16")
DROPPED_SUFFIXES = (".input_scale", ".k_scale", ".v_scale")  # the source's activation / KV-cache scales
_FIX = "Re-download or re-export the FP8 checkpoint, or convert from its BF16 version"


@dataclass(frozen=True)
class Fp8Weight:
    """Where an FP8 weight's scale is and how much of the weight one scale value covers."""

    scale: str  # the scale tensor's name
    block: tuple[int, int] | None  # (rows, columns) per scale value; None: one scale for the tensor


@dataclass(frozen=True)
class Fp8Source:
    """What the source's ``quantization_config`` says: the flavour, the scale suffix, the block size."""

    flavour: str
    suffixes: tuple[str, ...]  # scale tensor suffixes, most specific first
    block: tuple[int, int] | None


def source_flavour(config: dict, *, where: str) -> Fp8Source | None:
    """The FP8 flavour ``config`` declares, None for an unquantized source; refuses every other method."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    where = f"{where}/config.json"
    method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
    if method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            raise ConvertError(f"FP8 format {qc.get('fmt')!r} is not supported (only e4m3)", where=where, fix=_FIX)
        block = qc.get("weight_block_size")  # two positive integers or None (config_fields checks)
        if block is None:
            return Fp8Source("FP8 per-tensor", (".weight_scale_inv", ".weight_scale"), None)
        return Fp8Source(f"block FP8 {block[0]}x{block[1]}", (".weight_scale_inv",), (block[0], block[1]))
    if method == "modelopt" and qc.get("quant_algo") == "FP8":
        return Fp8Source("ModelOpt FP8", (".weight_scale",), None)
    if method == "compressed-tensors":
        fmt = qc.get("format", "unknown")
        raise ConvertError(f"compressed-tensors sources ({fmt}) are not supported", where=where,
                           fix="Convert from the BF16 checkpoint instead")
    detail = f", quant_algo={qc.get('quant_algo')}" if method == "modelopt" else ""
    raise ConvertError(f"the source is already quantized (quant_method={method}{detail})", where=where,
                       fix="Convert from the BF16/FP16 checkpoint instead")


def fp8_weights(source: Fp8Source | None, tensors: dict, *, where: str) -> tuple[dict[str, Fp8Weight], set[str]]:
    """Every FP8 weight with its scale, and the source tensors not carried over (scales, dropped ones).

    ``tensors`` maps names to objects with an ``info`` (a header's ``TensorInfo``). Bad FP8 input (a
    weight without its scale, a scale without its weight, a scale shape that does not fit) is refused.
    """
    weights: dict[str, Fp8Weight] = {}
    if source is None:
        return weights, set()
    claimed: set[str] = set()
    for name, t in tensors.items():
        info = t.info
        if not info.dtype.startswith("F8"):
            continue
        if info.dtype != "F8_E4M3":
            raise ConvertError(f"tensor {name!r} is {info.dtype}; only E4M3 FP8 weights can be dequantized",
                               where=where, fix=_FIX)
        if not name.endswith(".weight") or len(info.shape) != 2:
            raise ConvertError(f"FP8 tensor {name!r} {list(info.shape)} is not a 2-D weight", where=where, fix=_FIX)
        module = name[: -len(".weight")]
        scale = f"{module}{source.suffixes[0]}"
        if scale not in tensors:
            scale = next((f"{module}{s}" for s in source.suffixes[1:] if f"{module}{s}" in tensors), None)
        if scale is None:
            raise ConvertError(f"FP8 weight {name!r} has no {source.suffixes[0][1:]}", where=where, fix=_FIX)
        _check_scale(name, info.shape, scale, tensors[scale].info, source, where=where)
        weights[name] = Fp8Weight(scale, source.block if math.prod(tensors[scale].info.shape) > 1 else None)
        claimed.add(scale)
    if not weights:
        raise ConvertError(f"config.json declares {source.flavour}, but no tensor is FP8", where=where,
                           fix="Fix or remove quantization_config in config.json")
    dropped = set()
    for name in tensors:
        if name.endswith(source.suffixes) and name not in claimed:
            raise ConvertError(f"scale {name!r} belongs to no FP8 weight", where=where, fix=_FIX)
        if name.endswith(DROPPED_SUFFIXES) and name not in claimed:
            dropped.add(name)
    return weights, claimed | dropped


def _check_scale(weight: str, shape: tuple[int, ...], scale: str, info, source: Fp8Source, *, where: str) -> None:
    if info.dtype not in SCALE_DTYPES:
        raise ConvertError(f"scale {scale!r} is {info.dtype}, expected one of {', '.join(SCALE_DTYPES)}",
                           where=where, fix=_FIX)
    if source.block is None:
        expected: tuple[int, ...] | None = None
        fits = math.prod(info.shape) == 1
    else:
        expected = tuple(math.ceil(d / b) for d, b in zip(shape, source.block))
        fits = tuple(info.shape) == expected
    if not fits:
        wanted = f"{list(expected)} (blocks of {source.block[0]}x{source.block[1]})" if expected else "one value"
        raise ConvertError(f"scale {scale!r} has shape {list(info.shape)}; weight {weight!r} {list(shape)} needs "
                           f"{wanted}", where=where, fix=_FIX)


def check_scale_values(scale: torch.Tensor, name: str, *, where: str) -> None:
    """Refuse non-finite scales before they turn a weight into NaN or Inf."""
    if not bool(torch.isfinite(scale).all()):
        raise ConvertError(f"scale {name!r} holds NaN or Inf", where=where, fix=_FIX)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, *,
               row_start: int = 0) -> torch.Tensor:
    """BF16 ``weight * scale`` for rows ``[row_start, row_start + len(weight))`` of an FP8 weight.

    ``weight`` holds those rows (E4M3), ``scale`` is the whole weight's scale tensor. The product is
    float32 (exact operands, one rounding), then rounded to nearest-even BF16. Edge blocks may be partial.
    """
    values = weight.to(torch.float32)
    scale = scale.to(device=weight.device, dtype=torch.float32)
    if block is None:
        return (values * scale.reshape(())).to(torch.bfloat16)
    rows, cols = weight.shape
    bn, bk = block
    first = row_start // bn
    s = scale[first : (row_start + rows - 1) // bn + 1]
    if row_start % bn == 0 and rows % bn == 0 and cols % bk == 0:  # whole blocks: broadcast, no expansion
        product = values.view(rows // bn, bn, cols // bk, bk) * s[:, None, :, None]
        return product.to(torch.bfloat16).view(rows, cols)
    offset = row_start - first * bn
    s = s.repeat_interleave(bn, 0)[offset : offset + rows].repeat_interleave(bk, 1)[:, :cols]
    return (values * s).to(torch.bfloat16)
