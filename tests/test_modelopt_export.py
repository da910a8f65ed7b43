"""The strongest check we have: our output equals a real ModelOpt 0.47 export of the same model.

ModelOpt calibrates activations, so ``input_scale`` values differ (ours are the data-free 1.0); every
other tensor, its dtype and shape, and both config files must be identical.

Users run ModelOpt on a GPU, where its ``amax / (6.0 * 448.0)`` is a multiplication by fl(1/2688)
(see ``cuda_division.py``). ModelOpt runs here under :class:`CudaScalarDivision`, which makes exactly that
one substitution inside ModelOpt's own code, and each test also checks that its model holds a global scale
where the GPU and CPU arithmetics differ by an ulp, so a converter that divided would fail.
"""

from __future__ import annotations

import json

import pytest
import torch

from checks import load_all, raw_bytes
from cuda_division import CudaScalarDivision
from modelopt_oracle import modelopt_export
from nvfp4_convert import convert
from nvfp4_convert.kernels.common import INV_GLOBAL

DEEPSEEK_LIKE_MODELOPT = """
name = "deepseek-all"
extends = "default"
quantize = ["model.layers.*"]
exclude = ["model.layers.*.mlp.gate"]
"""


def assert_discriminates(source, exported):
    """Some exported ``weight_scale_2`` is ``amax * fl(1/2688)`` for an amax where ``amax / 2688`` differs.

    A group's amax is one of its members' amax, so each module's own amax is tried.
    """
    found = []
    for name, ws2 in exported.items():
        if name.endswith(".weight_scale_2"):
            own = source[name.removesuffix("_scale_2")].abs().amax().float()
            if ws2 == own * INV_GLOBAL and ws2 != own / 2688.0:
                found.append(name)
    assert found, "no global scale in this model tells GPU from CPU arithmetic; pick another seed"


# Every family ModelOpt 0.47 exports on the CPU. Not here: GPT-2 (ModelOpt quantizes HF Conv1D weights
# along their [in, out] rows, which we refuse to do) and experts whose width is not a multiple of 16
# (ModelOpt's export asserts).
FLOAT32_ROUTERS = ("deepseek_v3", "glm4_moe")  # transformers holds these routers in float32
SCALED_EMBEDDINGS = ("gemma2", "gemma3_text", "gemma3")  # a subclass of nn.Embedding, which ModelOpt 0.47 does not list
SEEDS = {"phi3": 4}  # seeds whose models hold a global scale that tells the two arithmetics apart


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "qwen2_moe",
                                  "qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe", "qwen2_5_vl", "gemma3"])
def test_matches_modelopt_export(kind, tiny, tmp_path):
    src = tiny(kind, **({"seed": SEEDS[kind]} if kind in SEEDS else {}))
    modelopt_export(src, tmp_path / "modelopt")
    options = {}
    if kind == "deepseek_v3":  # ModelOpt's default quantizes MLA too; our recipe keeps it BF16 by design
        recipe = tmp_path / "recipe.toml"
        recipe.write_text(DEEPSEEK_LIKE_MODELOPT)
        options["recipe_file"] = recipe
    convert(str(src), tmp_path / "ours", max_shard_size="30KB", progress=False, **options)
    theirs, ours = load_all(tmp_path / "modelopt"), load_all(tmp_path / "ours")
    assert sorted(theirs) == sorted(ours)
    assert_discriminates(load_all(src), theirs)
    for name, t in theirs.items():
        if t.dtype == torch.float32 and ours[name].dtype == torch.bfloat16 and kind in FLOAT32_ROUTERS:
            # ModelOpt saves the float32 router transformers holds; we copy the source bytes
            assert name.startswith("model.layers.") and ".mlp.gate." in name, name
            assert torch.equal(t, ours[name].float()), name
            continue
        assert (t.dtype, tuple(t.shape)) == (ours[name].dtype, tuple(ours[name].shape)), name
        if not name.endswith(".input_scale"):
            assert raw_bytes(t) == raw_bytes(ours[name]), name
    if kind != "deepseek_v3":
        for filename, key in (("hf_quant_config.json", "quantization"), ("config.json", "quantization_config")):
            a = json.loads((tmp_path / "modelopt" / filename).read_text())[key]
            b = json.loads((tmp_path / "ours" / filename).read_text())[key]
            if kind in SCALED_EMBEDDINGS:  # engines never quantize embeddings: listing one changes nothing
                key = next(k for k in ("exclude_modules", "ignore") if k in b)
                b[key] = [e for e in b[key] if not e.endswith("model.embed_tokens")]
            assert a == b, filename


def test_random_tensors_match_modelopt_gpu_arithmetic():
    """Reference and numba backends equal ModelOpt's quantizer, GPU arithmetic, on 240 tensors."""
    pytest.importorskip("modelopt.torch.quantization")
    from nvfp4_convert.kernels import cpu, reference
    from nvfp4_convert.kernels.common import global_scale
    from oracle_cases import cases, modelopt_quantize

    backends = [reference] + ([cpu] if cpu.available() is None else [])
    ulp_apart = 0
    for name, w in cases():
        with CudaScalarDivision():
            packed, scales, ws2 = modelopt_quantize(w.clone())
        amax = reference.amax(w)
        ulp_apart += bool(ws2 != amax / 2688.0)
        assert raw_bytes(global_scale(amax)) == raw_bytes(ws2), name
        for backend in backends:
            got_packed, got_scales = backend.quantize(w, global_scale(backend.amax(w)))
            assert torch.equal(got_scales.view(torch.uint8), scales), (backend.__name__, name)
            assert torch.equal(got_packed, packed), (backend.__name__, name)
    assert ulp_apart >= 20  # the cases tell the two arithmetics apart; a divider would fail above
