"""Every engine reads every converted tiny model the way the checkpoint is written.

The functions below restate, in our own code, how vLLM 0.33, SGLang 0.5.23 and TensorRT-LLM parse the
config files and decide, module by module, whether a module is excluded from NVFP4. Each names the engine
file and commit it follows. The tests convert a tiny model of every recipe and check, for each engine
module (fused Linears and FusedMoE containers as the engine builds them), that the engine's decision
matches what the checkpoint holds: NVFP4 tensors for every shard, or high-precision ones for every shard.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors import safe_open

from nvfp4_convert import convert
from nvfp4_convert.plan import EXPERT_MODULE
from nvfp4_convert.verify import verify

# ---------------------------------------------------------------------------------------------------
# Config parsing
# ---------------------------------------------------------------------------------------------------

VLLM_QUANT_ALGOS = {"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8",
                    "MIXED_PRECISION"}
SGLANG_FP4_ALGOS = {"FP8", "NVFP4", "NVFP4_AWQ", "W4A16_NVFP4"}
TRTLLM_QUANT_ALGOS = {"FP8", "NVFP4", "W4A16_NVFP4", "FP8_BLOCK_SCALES", "MIXED_PRECISION"}


def vllm_parse(folder: Path) -> tuple[str, list[str], int]:
    """vLLM: config.json's ``quantization_config`` wins over hf_quant_config.json
    (vllm/transformers_utils/config.py get_config); flat form read by ``ModelOptQuantConfigBase.from_config``
    (vllm/model_executor/layers/quantization/modelopt.py @ 00155cdecca722d98e34234c3d172725b7720b7d):
    ``quant_algo`` upper-cased and checked against ``QUANT_ALGOS``, ``ignore`` as the exclusions,
    ``group_size`` absent means 16."""
    config = json.loads((folder / "config.json").read_text())
    qc = config.get("quantization_config") or {"quant_method": "modelopt", **json.loads(
        (folder / "hf_quant_config.json").read_text())}
    assert qc["quant_method"].startswith("modelopt") or qc.get("producer", {}).get("name") == "modelopt"
    if "quantization" in qc:
        q = qc["quantization"]
        algo, excludes, group = q["quant_algo"], q["exclude_modules"], q["group_size"]
    else:
        algo, excludes, group = qc["quant_algo"], qc.get("ignore", []), qc.get("group_size") or 16
    algo = str(algo).upper()
    if algo not in VLLM_QUANT_ALGOS:
        raise ValueError(f"ModelOpt currently only supports: {sorted(VLLM_QUANT_ALGOS)}")
    assert "FP4" in algo  # override_quantization_method -> modelopt_fp4
    return algo, list(excludes), int(group)


def sglang_parse(folder: Path) -> tuple[str, list[str], int]:
    """SGLang 0.5.23: configs/model_config.py ``_parse_quant_hf_config`` takes config.json's
    ``quantization_config``; ``ModelOptFp4Config.from_config`` (layers/quantization/modelopt_quant.py) reads
    the flat form first: ``group_size`` from ``config_groups.*.weights.group_size`` (else 16), exclusions
    from ``ignore``, then ``modules_to_not_convert``, then ``exclude_modules``; algo must be one of
    FP8/NVFP4/NVFP4_AWQ/W4A16_NVFP4."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    algo = qc["quant_algo"]
    if algo not in SGLANG_FP4_ALGOS:
        raise ValueError(f"ModelOpt currently only supports: {sorted(SGLANG_FP4_ALGOS)} quantizations in sglang")
    group = next((g["weights"]["group_size"] for g in qc.get("config_groups", {}).values()
                  if g.get("weights", {}).get("group_size")), 16)
    excludes = qc.get("ignore") or qc.get("modules_to_not_convert") or qc.get("exclude_modules") or []
    return algo, list(excludes), int(group)


def trtllm_parse(folder: Path) -> tuple[str, list[str], int]:
    """TensorRT-LLM: llmapi/llm_utils.py ``ModelLoader._update_from_hf_quant_config`` reads
    hf_quant_config.json first and it wins; ``quant_algo`` must be a ``QuantAlgo`` value, ``group_size`` and
    ``exclude_modules`` come from the ``quantization`` section."""
    q = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    if q["quant_algo"] not in TRTLLM_QUANT_ALGOS:
        raise ValueError(f"{q['quant_algo']!r} is not a valid QuantAlgo")
    return q["quant_algo"], list(q["exclude_modules"]), int(q["group_size"])


# ---------------------------------------------------------------------------------------------------
# Exclusion decisions
# ---------------------------------------------------------------------------------------------------


def vllm_apply_mapper(excludes: list[str], prefixes: dict[str, str]) -> list[str]:
    """``ModelOptQuantConfigBase.apply_vllm_mapper`` (modelopt.py @ 00155cd): ``X*`` (not ``X.*``) becomes
    ``X`` and ``X.*``, then the model's ``hf_to_vllm_mapper`` renames every entry."""
    out = []
    for e in excludes:
        out += [e[:-1], e[:-1] + ".*"] if len(e) >= 2 and e[-1] == "*" and e[-2] != "." else [e]
    return [map_prefix(e, prefixes) for e in out]


def vllm_is_layer_skipped(prefix: str, ignored: list[str], fused: dict[str, list[str]]) -> bool:
    """``is_layer_skipped`` (vllm/model_executor/layers/quantization/utils/quant_utils.py @ 01693a61cbed):
    a fused name is skipped when all its shards are listed (some-but-not-all raises); a prefix containing
    ``experts`` is skipped when it is a substring of a listed name that contains ``experts``."""
    proj = prefix.split(".")[-1]
    if proj in fused:
        states = {prefix.replace(proj, shard) in ignored for shard in fused[proj]}
        if len(states) > 1:
            raise ValueError(f"Detected some but not all shards of {prefix} are quantized")
        return states.pop()
    if "experts" in prefix:
        return any(prefix in name for name in ignored if "experts" in name)
    return prefix in ignored


def vllm_excluded(prefix: str, excludes: list[str], fused: dict[str, list[str]]) -> bool:
    """``ModelOptQuantConfigBase.is_layer_excluded`` + ``get_quant_method`` (modelopt.py @ 00155cd):
    is_layer_skipped, then ``exclude in prefix`` (also with ``language_model.`` stripped), then fnmatch;
    a Linear whose name holds ``vision_tower``/``vision_model``/``visual`` is never quantized."""
    if excludes and vllm_is_layer_skipped(prefix, excludes, fused):
        return True
    for e in excludes:
        if e != prefix and (e in prefix or (prefix.startswith("language_model.")
                                            and e in prefix.removeprefix("language_model."))):
            return True
    if any(fnmatch.fnmatch(prefix, e) for e in excludes):
        return True
    return any(v in prefix for v in ("vision_tower", "vision_model", "visual"))


def _module_path_match(ignored: str, prefix: str) -> bool:
    """SGLang 0.5.23 layers/quantization/utils.py ``_module_path_match``: equality, a dotted ancestor, or a
    whole dotted segment run inside the prefix."""
    ignored, prefix = ignored.rstrip("."), prefix.rstrip(".")
    return ignored == prefix or prefix.startswith(ignored + ".") or f".{ignored}." in f".{prefix}."


SGLANG_FALLBACK_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def sglang_is_layer_skipped(prefix: str, ignored: list[str], fused: dict[str, list[str]]) -> bool:
    """SGLang 0.5.23 layers/quantization/utils.py ``is_layer_skipped``: the model's packed mapping, else the
    qkv/gate_up fallback; shards matched on dotted boundaries; ``experts`` prefixes as in vLLM."""
    proj = prefix.split(".")[-1]
    effective = fused if proj in fused else SGLANG_FALLBACK_FUSED
    if proj in effective:
        states = {any(_module_path_match(i, prefix.replace(proj, s)) for i in ignored) for s in effective[proj]}
        if len(states) > 1:
            raise ValueError(f"Detected some but not all shards of {prefix} are quantized")
        return states.pop()
    skipped = any(_module_path_match(i, prefix) for i in ignored)
    if "experts" in prefix:
        skipped = skipped or any(prefix in name for name in ignored if "experts" in name)
    return skipped


def sglang_is_layer_excluded(prefix: str, excludes: list[str]) -> bool:
    """``ModelOptFp4Config.is_layer_excluded`` (python/sglang/srt/layers/quantization/modelopt_quant.py
    @ faeb96856c4417d55695feec2f4d2463c8adb7fd, unchanged in 0.5.23): ``re.fullmatch`` with ``.`` -> ``\\.``
    and ``*`` -> ``.*``; an MLA pattern (q_a/q_b/kv_a_proj_with_mqa/kv_b) matches any 5-part prefix whose
    last part contains it."""
    fused_patterns = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"]
    parts = prefix.split(".")
    for pattern in excludes:
        if re.fullmatch(pattern.replace(".", r"\.").replace("*", r".*"), prefix):
            return True
        last = pattern.split(".")[-1]
        if last in fused_patterns and last in parts[-1]:
            assert len(parts) == 5 and len(pattern.split(".")) == 5
            return True
    return False


def sglang_excluded(prefix: str, excludes: list[str], fused: dict[str, list[str]], *, moe: bool) -> bool:
    """SGLang 0.5.23 ``ModelOptFp4Config._get_quant_method``: a Linear is skipped by is_layer_skipped or
    is_layer_excluded; a FusedMoE only by is_layer_excluded on its container name."""
    if moe:
        return sglang_is_layer_excluded(prefix, excludes)
    return sglang_is_layer_skipped(prefix, excludes, fused) or sglang_is_layer_excluded(prefix, excludes)


def trtllm_is_module_excluded(name: str, excludes: list[str]) -> bool:
    """``QuantConfig.is_module_excluded_from_quantization`` (tensorrt_llm/models/modeling_utils.py, main;
    27712aa7 had a plain fnmatch): fnmatch or ``re:`` over the name and each dotted ancestor; ``X.*`` also
    matches ``X``."""
    candidate = name
    while True:
        for e in excludes:
            if e.startswith("re:") and re.fullmatch(e[3:], candidate):
                return True
            if fnmatch.fnmatchcase(candidate, e) or (e.endswith(".*") and fnmatch.fnmatchcase(candidate, e[:-2])):
                return True
        if "." not in candidate:
            return False
        candidate = candidate.rsplit(".", 1)[0]


def trtllm_excluded(name: str, excludes: list[str]) -> bool:
    """``DecoderModelForCausalLM.apply_quant_config_exclude_modules`` (tensorrt_llm/_torch/models/
    modeling_utils.py): a fused qkv/gate_up Linear is excluded when its own or any unfused name is."""
    candidates = [name]
    if name.endswith("qkv_proj"):
        candidates += [name.replace("qkv_proj", s) for s in ("q_proj", "k_proj", "v_proj")]
    elif name.endswith("gate_up_proj"):
        candidates += [name.replace("gate_up_proj", s) for s in ("gate_proj", "up_proj")]
    return any(trtllm_is_module_excluded(c, excludes) for c in candidates)


# ---------------------------------------------------------------------------------------------------
# Engine modules of a checkpoint
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineModule:
    names: dict[str, str]  # engine -> its name for the module
    shards: tuple[str, ...]  # checkpoint modules it loads
    moe: bool = False


# packed_modules_mapping, by engine: vLLM models/llama.py, qwen2.py, deepseek_v2.py (fused_qkv_a_proj),
# phi3.py (qkv_proj -> [qkv_proj]); SGLang models/deepseek_v2.py (fused_qkv_a_proj_with_mqa). TensorRT-LLM
# fuses MLA q_a/kv_a into the Linear named kv_a_proj_with_mqa.
FUSIONS = [
    ({"q_proj", "k_proj", "v_proj"}, {"vllm": "qkv_proj", "sglang": "qkv_proj", "trtllm": "qkv_proj"}),
    ({"gate_proj", "up_proj"}, {"vllm": "gate_up_proj", "sglang": "gate_up_proj", "trtllm": "gate_up_proj"}),
    ({"q_a_proj", "kv_a_proj_with_mqa"},
     {"vllm": "fused_qkv_a_proj", "sglang": "fused_qkv_a_proj_with_mqa", "trtllm": "kv_a_proj_with_mqa"}),
]
PACKED = {"vllm": {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"],
                   "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"]},
          "sglang": {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"],
                     "fused_qkv_a_proj_with_mqa": ["q_a_proj", "kv_a_proj_with_mqa"]}}
PHI3_PACKED = {"qkv_proj": ["qkv_proj"], "gate_up_proj": ["gate_up_proj"]}  # vllm/model_executor/models/phi3.py
NOT_LINEAR = re.compile(r"(embed_tokens|embeddings?|wte|wpe|patch_embed.*|position_embedding|"
                        r"mm_input_projection_weight)$")
# vLLM's Qwen2.5-VL hf_to_vllm_mapper (models/qwen2_5_vl.py) for transformers-5 names
VL_MAPPERS = {
    "qwen2_5_vl": {"model.language_model.": "language_model.model.", "model.visual.": "visual.",
                   "lm_head.": "language_model.lm_head.", "model.": "language_model.model."},
    "gemma3": {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.",
               "model.multi_modal_projector.": "multi_modal_projector.", "lm_head.": "language_model.lm_head."},
}  # vLLM's hf_to_vllm_mapper of models/qwen2_5_vl.py and models/gemma3_mm.py


def map_prefix(name: str, prefixes: dict[str, str]) -> str:
    return next((to + name[len(old):] for old, to in prefixes.items() if name.startswith(old)), name)


def checkpoint_modules(folder: Path) -> dict[str, bool]:
    """Every Linear-like module of the checkpoint -> whether it is NVFP4."""
    names = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                names[key] = len(f.get_slice(key).get_shape())
    modules = {}
    for key, ndim in names.items():
        if key.endswith(".weight") and ndim == 2:
            module = key[: -len(".weight")]
            if not NOT_LINEAR.search(module):
                modules[module] = f"{module}.weight_scale" in names
    return modules


def engine_modules(modules: dict[str, bool]) -> list[EngineModule]:
    """The modules engines build: FusedMoE containers over the experts, fused Linears, single Linears."""
    out, done = [], set()
    by_layer: dict[str, list[str]] = {}
    for m in modules:
        if e := EXPERT_MODULE.match(m):
            by_layer.setdefault(e["layer"], []).append(m)
    for layer, experts in by_layer.items():
        out.append(EngineModule(dict.fromkeys(("vllm", "sglang", "trtllm"), layer), tuple(experts), moe=True))
        done.update(experts)
    siblings: dict[str, set[str]] = {}
    for m in modules:
        head, _, leaf = m.rpartition(".")
        siblings.setdefault(head, set()).add(leaf)
    for head, leaves in siblings.items():
        for members, names in FUSIONS:
            if members <= leaves and not {f"{head}.{x}" for x in members} & done:
                shards = tuple(sorted(f"{head}.{x}" for x in members))
                out.append(EngineModule({k: f"{head}.{v}" for k, v in names.items()}, shards))
                done.update(shards)
    out += [EngineModule(dict.fromkeys(("vllm", "sglang", "trtllm"), m), (m,)) for m in modules if m not in done]
    return out


def head_name(modules) -> str:
    """Where the LM head sits in this layout (engines build it even when it is tied to the embeddings)."""
    return "language_model.lm_head" if any(m.startswith("language_model.model.") for m in modules) else "lm_head"


def assert_every_engine_agrees(folder: Path, *, phi3: bool = False, vl: str | None = None) -> dict[str, int]:
    """Each engine's decision for each module equals what the checkpoint holds; returns counts by engine."""
    modules = checkpoint_modules(folder)
    modules.setdefault(head_name(modules), False)  # a tied head is high precision (it is the embedding)
    parsed = {"vllm": vllm_parse(folder), "sglang": sglang_parse(folder), "trtllm": trtllm_parse(folder)}
    for algo, _, group in parsed.values():
        assert algo == "NVFP4" and group == 16
    mapper = VL_MAPPERS.get(vl, {})
    vllm_excludes = vllm_apply_mapper(parsed["vllm"][1], mapper)
    checked = dict.fromkeys(parsed, 0)
    for module in engine_modules(modules):
        states = {modules[s] for s in module.shards}
        assert len(states) == 1, f"{module.shards} mix NVFP4 and high precision"
        want_excluded = not states.pop()
        fused = PHI3_PACKED if phi3 else PACKED["vllm"]
        got = {
            "vllm": vllm_excluded(map_prefix(module.names["vllm"], mapper), vllm_excludes, fused),
            "sglang": sglang_excluded(module.names["sglang"], parsed["sglang"][1], PACKED["sglang"], moe=module.moe),
            "trtllm": trtllm_excluded(module.names["trtllm"], parsed["trtllm"][1]),
        }
        for engine, excluded in got.items():
            assert excluded == want_excluded, (
                f"{engine} {'excludes' if excluded else 'quantizes'} {module.names[engine]}, "
                f"which the checkpoint holds {'high precision' if want_excluded else 'as NVFP4'}")
            checked[engine] += 1
    return checked


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------

CASES = {  # name: (tiny kind, tiny options, convert options)
    "llama": ("llama", {}, {}),
    "mistral": ("mistral", {}, {}),
    "qwen2": ("qwen2", {}, {}),
    "qwen3": ("qwen3", {}, {}),
    "qwen2_moe": ("qwen2_moe", {}, {}),
    "qwen3_moe": ("qwen3_moe", {}, {}),
    "mixtral": ("mixtral", {}, {}),
    "deepseek_v3-mtp": ("deepseek_v3", {"mtp": True}, {}),
    "phi3": ("phi3", {}, {}),
    "gemma2": ("gemma2", {}, {}),
    "gemma3": ("gemma3_text", {}, {}),
    "glm4_moe": ("glm4_moe", {}, {}),
    "qwen2_5_vl": ("qwen2_5_vl", {}, {}),
    "gemma3-vl": ("gemma3", {"tie_word_embeddings": True}, {}),
    "gpt2": ("gpt2", {}, {}),
    "qwen3_moe-exclude-layer-1": ("qwen3_moe", {}, {"excludes": ["model.layers.1.mlp.experts.*"]}),
    "deepseek_v3-exclude-experts-2": ("deepseek_v3", {"mtp": True}, {"excludes": ["model.layers.2.mlp.experts.*"]}),
    "mixtral-exclude-attention-0": ("mixtral", {}, {"excludes": ["model.layers.0.self_attn.*"]}),
    "qwen3_moe-experts-40-wide": ("qwen3_moe_k40", {}, {}),
    "tied-llama": ("llama", {"tie_word_embeddings": True}, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_engine_reads_the_checkpoint_as_written(case, tiny, tmp_path):
    kind, tiny_options, options = CASES[case]
    src, out = tiny(kind, **tiny_options), tmp_path / "out"
    report = convert(str(src), out, progress=False, max_shard_size="40KB", **options)
    checked = assert_every_engine_agrees(out, phi3=kind == "phi3", vl=kind if kind in VL_MAPPERS else None)
    verified = verify(out, source=str(src), progress=False)
    assert verified.ok, [str(v) for v in verified.violations]
    assert min(checked.values()) > 2
    if kind not in ("gpt2", "qwen3_moe_k40") and "excludes" not in options:
        assert report.plan.quantized  # the families quantize their decoder
    if case == "deepseek_v3-mtp":
        assert report.plan.exclude_modules[-1] == "model.layers.3*"
    if case.startswith("qwen3_moe-"):
        assert not any(".experts." in m for m in report.plan.quantized if m.startswith("model.layers.1."))


def test_per_expert_leaf_names_are_misread_by_sglang_and_trtllm(tiny, tmp_path):
    """What the checkpoint used to list for an excluded MoE layer: vLLM reads it, SGLang and TensorRT-LLM
    build an NVFP4 FusedMoE over BF16 tensors. The decision functions above must see that."""
    out = tmp_path / "out"
    convert(str(tiny("qwen3_moe")), out, progress=False, excludes=["model.layers.1.mlp.experts.*"])
    modules = checkpoint_modules(out)
    leaves = [m for m in modules if m.startswith("model.layers.1.mlp.experts.")]
    container = "model.layers.1.mlp.experts"
    assert vllm_excluded(container, leaves, PACKED["vllm"])
    assert not sglang_excluded(container, leaves, PACKED["sglang"], moe=True)
    assert not trtllm_excluded(container, leaves)
    summary = json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert sglang_excluded(container, summary, PACKED["sglang"], moe=True) and trtllm_excluded(container, summary)


def test_decision_functions_catch_a_partly_excluded_fused_group():
    excludes = ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match="some but not all shards"):
        vllm_excluded("model.layers.0.self_attn.qkv_proj", excludes, PACKED["vllm"])
    assert trtllm_excluded("model.layers.0.self_attn.qkv_proj", excludes)  # any unfused name excludes it
    assert not sglang_is_layer_excluded("model.layers.0.self_attn.qkv_proj", excludes)
    assert vllm_excluded("model.layers.10.mlp.down_proj", ["model.layers.1"], {})  # the bare-prefix trap
