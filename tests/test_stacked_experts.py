"""Fused 3-D experts (transformers 5's Llama-4 layout): our output equals ModelOpt 0.47's export of them."""

from __future__ import annotations

import json

import pytest
import torch

from checks import load_all, raw_bytes
from modelopt_oracle import modelopt_export
from nvfp4_convert import convert
from nvfp4_convert.kernels import reference
from nvfp4_convert.kernels.common import global_scale


@pytest.fixture(scope="module")
def tiny_llama4(tmp_path_factory):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.Llama4TextConfig(vocab_size=128, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1)
    model = tf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.empty(p.shape[:-1] + (1,)).log_normal_(0, 1).to(p.dtype))
    path = tmp_path_factory.mktemp("llama4") / "src"
    model.save_pretrained(path, max_shard_size="40KB")
    return path


def test_stacked_experts_quantized_along_their_input_axis(tiny_llama4, tmp_path):
    report = convert(str(tiny_llama4), tmp_path / "out", progress=False)
    source, out = load_all(tiny_llama4), load_all(tmp_path / "out")
    name = "model.layers.1.feed_forward.experts.gate_up_proj"
    assert source[name].shape == (4, 64, 64) and name in report.plan.quantized
    for stacked in [n for n in source if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
        w = source[stacked]
        ws2 = global_scale(w.abs().amax().float())
        for e in range(w.shape[0]):  # expert e's Linear weight is w[e].T: blocks of 16 along w's axis 1
            packed, scales = reference.quantize(w[e].t().contiguous(), ws2)
            assert torch.equal(out[stacked][e], packed.t()), stacked
            assert torch.equal(out[f"{stacked}_weight_scale"][e].view(torch.uint8), scales.t().view(torch.uint8))
        assert raw_bytes(out[f"{stacked}_weight_scale_2"]) == raw_bytes(ws2)
        assert out[f"{stacked}_input_scale"].item() == 1.0
    assert "model.layers.0.feed_forward.router" in report.plan.exclude_modules
    from nvfp4_convert.verify import verify

    checked = verify(tmp_path / "out", progress=False)
    assert checked.ok, [v.line() for v in checked.violations]


def test_stacked_experts_equal_modelopt_export(tiny_llama4, tmp_path):
    modelopt_export(tiny_llama4, tmp_path / "modelopt")
    convert(str(tiny_llama4), tmp_path / "ours", progress=False)
    theirs, ours = load_all(tmp_path / "modelopt"), load_all(tmp_path / "ours")
    experts = {n for n in theirs if ".experts." in n}
    assert experts and experts == {n for n in ours if ".experts." in n}
    for n in experts:
        assert theirs[n].dtype == ours[n].dtype and theirs[n].shape == ours[n].shape, n
        if not n.endswith("_input_scale"):  # ModelOpt calibrates activations; ours are data-free
            assert raw_bytes(theirs[n]) == raw_bytes(ours[n]), n
    hf_theirs = json.loads((tmp_path / "modelopt" / "hf_quant_config.json").read_text())["quantization"]
    hf_ours = json.loads((tmp_path / "ours" / "hf_quant_config.json").read_text())["quantization"]
    assert hf_ours["exclude_modules"] == hf_theirs["exclude_modules"]
