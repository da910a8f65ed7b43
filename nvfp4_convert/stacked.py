"""Fused 3-D expert tensors, as transformers 5 saves some MoE models: which layouts convert, and how.

transformers 5 holds the experts of Qwen2/3-MoE, DeepSeek-V2/V3 and GLM-4 MoE fused in memory
(``mlp.experts.gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, each expert's slice an ``[out, in]``
Linear weight) and ``save_pretrained`` writes them back one Linear per expert; only
``save_original_format=False`` leaves them fused on disk. ModelOpt 0.47 exports fused experts of these
models one Linear per expert (``_export_fused_experts``): ``experts.{e}.gate_proj`` is rows ``[:I]`` of
expert e's slice, ``up_proj`` rows ``[I:]``, ``down_proj`` its down slice, gate and up sharing one
``weight_scale_2``; byte for byte what it writes for the same weights saved per expert, and what vLLM
and SGLang load. :func:`unfuse` presents such tensors as those per-expert weights, each a view of its
own byte range, so the rest of the converter sees an ordinary per-expert checkpoint.

Mixtral is not unfused: ModelOpt writes its fused experts as ``mlp.experts.{e}.gate_proj`` (the
in-memory names), while vLLM and SGLang read Mixtral experts as ``block_sparse_moe.experts.{e}.w1/w2/w3``.

Llama-4 keeps its experts as batched matrices in ``[E, in, out]`` layout (``feed_forward.experts.gate_up_proj
[E, H, 2I]``, ``down_proj [E, I, H]``). ModelOpt 0.47 exports them 3-D, under the same names: each expert's
Linear weight is the transpose, quantized in blocks of 16 along its input dimension, and written back
transposed: ``<name>`` U8 ``[E, in/2, out]``, ``<name>_weight_scale`` F8_E4M3 ``[E, in/16, out]``, and one
``<name>_weight_scale_2`` and ``<name>_input_scale`` (0-dim F32) for all experts of the tensor.

Other fused layouts have no exporter contract to follow: they are refused, never quantized along a
guessed axis.
"""

from __future__ import annotations

import dataclasses
import re

from .errors import ConvertError
from .safetensors_io import DTYPE_SIZES, FLOAT_DTYPES, OutTensor, ShardHeader, TensorInfo

STACKED = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
IN_OUT_MODEL_TYPES = ("llama4", "llama4_text")  # batched [E, in, out] experts
SUFFIXES = ("_weight_scale", "_weight_scale_2", "_input_scale")
BLOCK = 16
FUSED = re.compile(r"^(?P<experts>.+\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
PER_EXPERT_MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe")  # [E, out, in]
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")  # config spellings (Qwen3-MoE: both)
FIX_FUSED = "Save it with transformers' save_pretrained (one Linear per expert), or convert the original checkpoint"


def unfuse(config: dict, headers: dict[str, ShardHeader], weight_map: dict[str, str] | None, *,
           where: str) -> tuple[dict[str, ShardHeader], dict[str, str] | None, list[TensorInfo]]:
    """``headers`` and ``weight_map`` with each fused ``[E, out, in]`` expert tensor replaced by its experts'
    Linear weights (``experts.{e}.gate_proj/up_proj/down_proj.weight``), each covering its own bytes; also
    the fused tensors so replaced.

    Only for :data:`PER_EXPERT_MODEL_TYPES`; the shapes must be the config's, so a tensor stored another
    way round is refused rather than read along the wrong axis.
    """
    model_type = config.get("model_type")
    if model_type not in PER_EXPERT_MODEL_TYPES:
        return headers, weight_map, []
    headers, weight_map = dict(headers), dict(weight_map) if weight_map is not None else None
    replaced = []
    for shard, header in headers.items():
        fused = [t for n, t in header.tensors.items() if FUSED.match(n)]
        if not fused:
            continue
        tensors = dict(header.tensors)
        replaced += fused
        for t in fused:
            del tensors[t.name]
            if weight_map is not None:
                weight_map.pop(t.name, None)
            for part in _experts(config, t, where=f"{where}/{shard}"):
                if part.name in tensors:
                    raise ConvertError(f"{part.name} is in the checkpoint both on its own and in {t.name}",
                                       where=f"{where}/{shard}", fix=FIX_FUSED)
                tensors[part.name] = part
                if weight_map is not None:
                    weight_map[part.name] = shard
        headers[shard] = dataclasses.replace(header, tensors=tensors)
    return headers, weight_map, replaced


def _experts(config: dict, t: TensorInfo, *, where: str) -> list[TensorInfo]:
    """The per-expert Linear weights held by fused tensor ``t``, in their byte order."""
    m = FUSED.match(t.name)
    experts_key = next((k for k in EXPERT_COUNT_KEYS if k in config), EXPERT_COUNT_KEYS[0])
    width_key = "moe_intermediate_size"
    sizes = {k: config.get(k) for k in (experts_key, width_key, "hidden_size")}
    if missing := [k for k, v in sizes.items() if type(v) is not int or v <= 0]:
        raise ConvertError(f"config.json has no {missing[0]}, which reading fused expert tensor {t.name} needs",
                           where=where, fix=FIX_FUSED)
    experts, width, hidden = sizes.values()
    gate_up = m["proj"] == "gate_up_proj"
    rows, cols = (2 * width, hidden) if gate_up else (hidden, width)
    if t.dtype not in FLOAT_DTYPES or t.shape != (experts, rows, cols):
        dims = f"2 * {width_key}, hidden_size" if gate_up else f"hidden_size, {width_key}"
        raise ConvertError(f"fused expert tensor {t.name} is {t.dtype}{list(t.shape)}, but {config['model_type']} "
                           f"stores it as a float [experts, out, in] = {[experts, rows, cols]} ({experts_key}, "
                           f"{dims})", where=where, fix=FIX_FUSED)
    leaves = ("gate_proj", "up_proj") if gate_up else ("down_proj",)
    size = rows // len(leaves) * cols * DTYPE_SIZES[t.dtype]
    start = t.data_offsets[0]
    parts = []
    for e in range(experts):
        for leaf in leaves:
            parts.append(TensorInfo(f"{m['experts']}.{e}.{leaf}.weight", t.dtype, (rows // len(leaves), cols),
                                    (start, start + size)))
            start += size
    return parts


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
