"""The strongest check we have: our output equals a real ModelOpt 0.47 export of the same model.

ModelOpt calibrates activations, so ``input_scale`` values differ (ours are the data-free 1.0); every
other tensor, its dtype and shape, and both config files must be identical.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from checks import load_all, raw_bytes

from nvfp4_convert import convert

DEEPSEEK_LIKE_MODELOPT = """
name = "deepseek-all"
extends = "default"
quantize = ["model.layers.*"]
exclude = ["model.layers.*.mlp.gate"]
"""


def modelopt_export(src, dst):
    warnings.filterwarnings("ignore")
    transformers = pytest.importorskip("transformers")
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.export import export_hf_checkpoint

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    vocab = model.config.vocab_size

    def calibrate(m):
        m(torch.randint(0, vocab, (2, 16)))

    export_hf_checkpoint(mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, calibrate), export_dir=dst)


@pytest.mark.parametrize("kind", ["llama", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3"])
def test_matches_modelopt_export(kind, tiny, tmp_path):
    src = tiny(kind)
    modelopt_export(src, tmp_path / "modelopt")
    options = {}
    if kind == "deepseek_v3":  # ModelOpt's default quantizes MLA too; our recipe keeps it BF16 by design
        recipe = tmp_path / "recipe.toml"
        recipe.write_text(DEEPSEEK_LIKE_MODELOPT)
        options["recipe_file"] = recipe
    convert(str(src), tmp_path / "ours", max_shard_size="30KB", progress=False, **options)
    theirs, ours = load_all(tmp_path / "modelopt"), load_all(tmp_path / "ours")
    assert sorted(theirs) == sorted(ours)
    for name, t in theirs.items():
        if t.dtype == torch.float32 and ours[name].dtype == torch.bfloat16 and kind == "deepseek_v3":
            # transformers holds DeepSeek's router in float32; ModelOpt saves that, we copy the source bytes
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
            assert a == b, filename
