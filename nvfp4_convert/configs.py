"""The two config files serving engines read, in ModelOpt's exact shapes (spec §5)."""

from __future__ import annotations

import copy

from .constants import BLOCK

PRODUCER = {"name": "modelopt", "version": "0.47.0"}  # engines detect the format by this producer name
FP4_SCHEME = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": BLOCK}  # config_groups entry


def quant_algo(weight_only: bool) -> str:
    return "W4A16_NVFP4" if weight_only else "NVFP4"


def hf_quant_config(*, exclude_modules: list[str], weight_only: bool) -> dict:
    """``hf_quant_config.json`` (nested form; TensorRT-LLM reads this file first)."""
    return {
        "producer": dict(PRODUCER),
        "quantization": {
            "quant_algo": quant_algo(weight_only),
            "kv_cache_quant_algo": None,
            "group_size": BLOCK,
            "exclude_modules": list(exclude_modules),
        },
    }


def quantization_config(*, exclude_modules: list[str], weight_only: bool) -> dict:
    """``config.json`` ``quantization_config`` (flat form; vLLM and SGLang read this first)."""
    group = {"weights": dict(FP4_SCHEME), "targets": ["Linear"]}
    if not weight_only:
        group = {"input_activations": dict(FP4_SCHEME), **group}
    return {
        "config_groups": {"group_0": group},
        "ignore": list(exclude_modules),
        "quant_algo": quant_algo(weight_only),
        "producer": dict(PRODUCER),
        "quant_method": "modelopt",
    }


def quantized_model_config(source_config: dict, *, exclude_modules: list[str], weight_only: bool) -> dict:
    """The source ``config.json`` with its ``quantization_config`` replaced by ours."""
    config = copy.deepcopy(source_config)
    config.pop("quantization_config", None)
    config["quantization_config"] = quantization_config(exclude_modules=exclude_modules, weight_only=weight_only)
    return config


def safetensors_index(*, weight_map: dict[str, str], total_size: int) -> dict:
    """``model.safetensors.index.json`` for the output shards."""
    return {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
