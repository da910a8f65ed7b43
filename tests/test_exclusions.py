"""``exclude_modules`` summaries equal ModelOpt 0.47's own summarizer, and MTP layers come last as ``prefix*``."""

from __future__ import annotations

import random

import pytest

from nvfp4_convert.exclusions import exclude_list, mtp_prefixes, summarize, vllm_forms


def _random_model(rng: random.Random) -> tuple[list[str], list[str]]:
    leaves = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate",
              "mlp.shared_expert.gate_proj", "mlp.shared_expert_gate", "mlp.gate_proj", "mlp.down_proj"]
    leaves += [f"mlp.experts.{e}.{p}" for e in range(3) for p in ("gate_proj", "up_proj", "down_proj")]
    names = ["lm_head", "model.embed_tokens", "model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0"]
    names += [f"model.layers.{i}.{leaf}" for i in range(rng.choice([2, 12, 21])) for leaf in leaves]
    quantized, unquantized = [], []
    odds = rng.random()
    for name in names:
        (quantized if rng.random() < odds and not name.startswith(("lm_head", "model.embed", "model.visual")) else
         unquantized).append(name)
    return unquantized, quantized


@pytest.mark.parametrize("seed", range(40))
def test_summary_equals_modelopt(seed):
    quant_utils = pytest.importorskip("modelopt.torch.export.quant_utils")
    unquantized, quantized = _random_model(random.Random(seed))
    want = sorted(quant_utils._prefix_wildcard_summarize_exclude_modules(unquantized, quantized))
    assert summarize(unquantized, quantized) == want


def test_whole_moe_layer_is_a_prefix_and_layer_1_never_covers_layer_10():
    quantized = [f"model.layers.{i}.mlp.experts.0.up_proj" for i in (0, 10)] + ["model.layers.1.self_attn.o_proj"]
    unquantized = [f"model.layers.1.mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "down_proj")]
    unquantized += ["model.layers.1.mlp.gate", "model.layers.2.self_attn.o_proj", "model.layers.2.mlp.gate"]
    assert summarize(unquantized, quantized) == ["model.layers.1.mlp*", "model.layers.2*"]
    quantized.append("model.layers.1.mlp.shared_experts.down_proj")
    assert summarize(unquantized, quantized) == ["model.layers.1.mlp.experts*", "model.layers.1.mlp.gate",
                                                 "model.layers.2*"]
    quantized.append("model.layers.20.mlp.gate_up_proj")  # now "model.layers.2*" would also cover layer 20
    assert "model.layers.2.*" in summarize(unquantized, quantized)


def test_mtp_layers_come_last_as_prefix_patterns():
    config = {"num_hidden_layers": 3, "num_nextn_predict_layers": 1}
    modules = ["model.layers.2.mlp.experts.0.up_proj", "model.layers.3.eh_proj", "model.layers.3.mlp.gate"]
    assert mtp_prefixes(config, modules) == ["model.layers.3"]
    assert mtp_prefixes({"num_hidden_layers": 3}, modules) == []
    assert exclude_list(["lm_head", "model.layers.3.eh_proj", "model.layers.3.mlp.gate"], modules[:1],
                        ["model.layers.3"]) == ["lm_head", "model.layers.3*"]
    # an MTP layer something of which is quantized is summarized like any other
    assert exclude_list(["model.layers.3.eh_proj"], ["model.layers.3.mlp.gate"], ["model.layers.3"]) == [
        "model.layers.3.eh_proj"]


def test_vllm_rewrites_prefix_patterns():
    assert vllm_forms("model.layers.1.mlp.experts*") == ("model.layers.1.mlp.experts", "model.layers.1.mlp.experts.*")
    assert vllm_forms("model.layers.1.*") == ("model.layers.1.*",)
    assert vllm_forms("lm_head") == ("lm_head",)


def test_matcher_agrees_with_fnmatch():
    import fnmatch

    from nvfp4_convert.exclusions import Matcher

    patterns = ["lm_head", "model.layers.3*", "model.layers.1.mlp.experts.*", "*.mlp.gate",
                "model.layers.[02].self_attn?q*"]
    names = ["lm_head", "lm_head2", "model.layers.3", "model.layers.30.mlp.down_proj", "model.layers.1.mlp.experts",
             "model.layers.1.mlp.experts.4.w1", "model.layers.7.mlp.gate", "model.layers.7.mlp.gate_proj",
             "model.layers.2.self_attn.q_a_proj", "model.layers.1.self_attn.q_a_proj"]
    matcher = Matcher(patterns)
    for name in names:
        want = next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)
        assert matcher.first(name) == want, name
        assert matcher.matches(name) == (want is not None), name
