"""Every field the tool reads from a JSON config, with the JSON type it must have: one home for checking them.

A field of the wrong type (``"num_hidden_layers": "x"``, ``"quantization_config": [1]``) is bad input named
by its dotted path; code past :func:`check_model_config` may rely on these types.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

from .errors import ConvertError


def _count(v) -> bool:
    return type(v) is int and v >= 0


def _names(v) -> bool:
    return isinstance(v, list) and all(isinstance(n, str) for n in v)


def _block(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(type(b) is int and b > 0 for b in v)


def _or_null(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: v is None or check(v)


# kind -> (what it must be, as the error says it, and its check)
KINDS: dict[str, tuple[str, Callable[[object], bool]]] = {
    "string": ("a string", lambda v: isinstance(v, str)),
    "string?": ("a string or null", _or_null(lambda v: isinstance(v, str))),
    "bool?": ("true, false or null", _or_null(lambda v: isinstance(v, bool))),
    "count?": ("a non-negative integer or null", _or_null(_count)),
    "object": ("an object", lambda v: isinstance(v, dict)),
    "object?": ("an object or null", _or_null(lambda v: isinstance(v, dict))),
    "names?": ("a list of strings or null", _or_null(_names)),
    "block?": ("two positive integers or null", _or_null(_block)),
}

_SIZES = {name: "count?" for name in (
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim",
    "intermediate_size", "vocab_size")}

# The source config.json: what planning, recipes, exclusions, FP8 detection, the data-free proxy and
# calibration read, plus what engines read to pick the model class and tie the head.
MODEL_FIELDS: dict[str, str] = {
    "model_type": "string",
    "architectures": "names?",
    "tie_word_embeddings": "bool?",
    "torch_dtype": "string?",
    "dtype": "string?",
    **_SIZES,
    "num_nextn_predict_layers": "count?",
    "num_experts": "count?",  # these four: reading fused experts (see stacked.py)
    "num_local_experts": "count?",
    "n_routed_experts": "count?",
    "moe_intermediate_size": "count?",
    "text_config": "object?",
    **{f"text_config.{name}": kind for name, kind in _SIZES.items()},
    "text_config.model_type": "string",
    "text_config.tie_word_embeddings": "bool?",
    "vision_config": "object?",
    "audio_config": "object?",
    "quantization_config": "object?",
    "quantization_config.quant_method": "string",
    "quantization_config.quant_algo": "string?",
    "quantization_config.fmt": "string",
    "quantization_config.format": "string",
    "quantization_config.weight_block_size": "block?",
    "quantization_config.producer": "object",
    "quantization_config.producer.name": "string",
    "quantization_config.config_groups": "object",
    "quantization_config.config_groups.group_0": "object",
}

HF_QUANT_FIELDS: dict[str, str] = {  # hf_quant_config.json, as verify reads it
    "producer": "object",
    "producer.name": "string",
}

INFO_FIELDS: dict[str, str] = {  # a finished conversion's record, as model cards read it
    "tool": "string", "source": "string", "source_revision": "string?", "command": "string?",
    "recipe": "object", "recipe.name": "string", "quant_algo": "string", "activation_policy": "string",
    "quantized_modules": "count?", "kept_tensors": "count?", "exclude_modules": "names?",
    "bytes_in": "count?", "bytes_out": "count?", "calibration": "object?", "calibration.dataset": "string",
    "calibration.samples": "count?", "calibration.seq_len": "count?", "calibration.method": "string",
    "license": "object?",
}


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 40 else text[:37] + "..."


def field_errors(doc: dict, fields: dict[str, str]) -> list[tuple[str, str]]:
    """``(field, what is wrong)`` for each field of ``doc`` present with the wrong type; a field inside a
    parent that is not an object is not looked at (the parent's own entry reports it)."""
    errors = []
    for name, kind in fields.items():
        parent, *path = name.split(".")
        value = doc
        for key in [parent, *path]:
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            expected, check = KINDS[kind]
            if not check(value):
                errors.append((name, f"field {name!r} is {_shown(value)}, expected {expected}"))
    return errors


def without_fields(doc: dict, names: list[str]) -> dict:
    """A copy of ``doc`` without the fields ``names`` (dotted paths, as :func:`field_errors` gives them)."""
    doc = copy.deepcopy(doc)
    for name in names:
        *parents, leaf = name.split(".")
        holder = doc
        for key in parents:
            holder = holder[key]
        del holder[leaf]
    return doc


def check_model_config(config, *, where: str) -> dict:
    """``config`` (a parsed ``config.json``) when it is an object with a string ``model_type`` and every
    field in :data:`MODEL_FIELDS` of its type; otherwise one ConvertError naming the first bad field."""
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConvertError("config.json has no model_type", where=where,
                           fix="Fix config.json (it must be a transformers model config)")
    for _, problem in field_errors(config, MODEL_FIELDS)[:1]:
        raise ConvertError(f"config.json {problem}", where=where,
                           fix="Fix that field in config.json (it must be a transformers model config)")
    return config


def read_model_config(source) -> dict:
    """The source's ``config.json``, checked by :func:`check_model_config`."""
    if "config.json" not in source.files:
        raise ConvertError("config.json is missing", where=source.description,
                           fix="Point at a Hugging Face checkpoint (folder or repo) that has config.json")
    return check_model_config(source.read_json("config.json"), where=f"{source.description}/config.json")
