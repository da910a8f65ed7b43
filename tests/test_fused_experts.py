"""Fused 3-D experts as transformers 5 holds them (``mlp.experts.gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
saved that way (``save_original_format=False``): converted one Linear per expert, as ModelOpt 0.47 exports them."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from checks import assert_one_line_error, load_all, raw_bytes
from modelopt_oracle import modelopt_export
from nvfp4_convert import ConvertError, convert
from nvfp4_convert.cli import app
from nvfp4_convert.kernels import reference
from nvfp4_convert.kernels.common import global_scale
from nvfp4_convert.verify import verify


def _quantization(folder):
    return (json.loads((folder / "hf_quant_config.json").read_text())["quantization"],
            json.loads((folder / "config.json").read_text())["quantization_config"])


def test_fused_experts_equal_modelopt_export(tiny, tmp_path):
    src = tiny("qwen3_moe_i48", fused=True)  # I = 48, H = 64: no expert matrix is square
    assert load_all(src)["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 96, 64)
    modelopt_export(src, tmp_path / "modelopt")
    convert(str(src), tmp_path / "ours", max_shard_size="30KB", progress=False)
    theirs, ours = load_all(tmp_path / "modelopt"), load_all(tmp_path / "ours")
    assert "model.layers.1.mlp.experts.3.up_proj.weight_scale_2" in theirs
    assert sorted(theirs) == sorted(ours)
    for name, t in theirs.items():
        assert (t.dtype, t.shape) == (ours[name].dtype, ours[name].shape), name
        if not name.endswith(".input_scale"):  # ModelOpt calibrates activations; ours are data-free
            assert raw_bytes(t) == raw_bytes(ours[name]), name
    assert _quantization(tmp_path / "ours") == _quantization(tmp_path / "modelopt")


def test_fused_experts_quantized_along_their_input_axis(tiny, tmp_path):
    src = tiny("qwen3_moe_i48", fused=True)
    report = convert(str(src), tmp_path / "out", max_shard_size="30KB", progress=False)
    source, out = load_all(src), load_all(tmp_path / "out")
    assert not any(n.endswith(("gate_up_proj", ".experts.down_proj")) for n in out)
    assert any("4 fused 3-D expert tensors" in w and "one Linear per expert" in w for w in report.plan.warnings)
    for layer in range(2):
        fused = f"model.layers.{layer}.mlp.experts"
        gate_up, down = source[f"{fused}.gate_up_proj"], source[f"{fused}.down_proj"]
        for e in range(4):
            gate_ws2 = global_scale(gate_up[e].abs().amax().float())  # gate and up share one global scale
            for leaf, w, ws2 in (("gate_proj", gate_up[e, :48], gate_ws2), ("up_proj", gate_up[e, 48:], gate_ws2),
                                 ("down_proj", down[e], global_scale(down[e].abs().amax().float()))):
                module = f"{fused}.{e}.{leaf}"
                assert module in report.plan.quantized
                packed, scales = reference.quantize(w.contiguous(), ws2)  # blocks of 16 along axis 1 (in)
                assert out[f"{module}.weight"].shape == (w.shape[0], w.shape[1] // 2)
                assert torch.equal(out[f"{module}.weight"], packed), module
                assert torch.equal(out[f"{module}.weight_scale"].view(torch.uint8), scales.view(torch.uint8))
                assert raw_bytes(out[f"{module}.weight_scale_2"]) == raw_bytes(ws2), module
    checked = verify(tmp_path / "out", source=str(src), progress=False)
    assert checked.ok, [v.line() for v in checked.violations]


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe", "deepseek_v3", "glm4_moe"])
def test_fused_source_converts_like_the_per_expert_one(kind, tiny, tmp_path):
    """Same model saved both ways: identical output (the per-expert one equals ModelOpt's export,
    test_modelopt_export.py), with its experts quantized or, excluded, copied per expert."""
    for excludes in ([], ["*.mlp.experts*"]):
        outs = {}
        for layout in ("per-expert", "fused"):
            outs[layout] = tmp_path / f"{layout}-{len(excludes)}"
            convert(str(tiny(kind, fused=layout == "fused")), outs[layout], max_shard_size="30KB", excludes=excludes,
                    progress=False)
        per_expert, fused = load_all(outs["per-expert"]), load_all(outs["fused"])
        assert sorted(per_expert) == sorted(fused)
        assert all(raw_bytes(t) == raw_bytes(fused[n]) for n, t in per_expert.items())
        assert _quantization(outs["fused"]) == _quantization(outs["per-expert"])
    assert any(n.endswith(".experts.0.up_proj.weight") and t.dtype == torch.bfloat16 for n, t in fused.items())


def test_fused_source_through_the_hub(tiny, fake_hub, tmp_path):
    src = tiny("qwen3_moe_i48", fused=True)
    fake_hub.add_repo("org/fused", src)
    convert("org/fused", tmp_path / "hub", endpoint=fake_hub.url, work_dir=tmp_path / "work", progress=False)
    convert(str(src), tmp_path / "local", progress=False)
    hub, local = load_all(tmp_path / "hub"), load_all(tmp_path / "local")
    assert sorted(hub) == sorted(local) and all(raw_bytes(t) == raw_bytes(local[n]) for n, t in hub.items())


def _rewrite(src, dst, change):
    """A copy of checkpoint ``src`` with ``change(name, tensor)`` applied to every fused expert tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for shard in dst.glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({n: change(n, t) if ".experts." in n and t.dim() == 3 else t for n, t in tensors.items()}, shard,
                  metadata={"format": "pt"})
    return dst


def test_fused_experts_stored_the_other_way_round_are_refused(tiny, tmp_path):
    # Llama-4's [E, in, out] under a model whose experts are [E, out, in]: read as is, blocks would run along out
    src = _rewrite(tiny("qwen3_moe_i48", fused=True), tmp_path / "transposed",
                   lambda n, t: t.transpose(1, 2).contiguous())
    with pytest.raises(ConvertError, match=r"fused expert tensor model\.layers\.\d\.mlp\.experts\.(gate_up|down)_proj "
                                           r"is BF16\[4, (64, 96|48, 64)\], but qwen3_moe stores it as a float "
                                           r"\[experts, out, in\] = \[4, (96, 64|64, 48)\]"):
        convert(str(src), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "config.json").exists()
    result = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "cli"), "--no-progress"])
    assert_one_line_error(result, "fused expert tensor", "[experts, out, in]", "save_pretrained")


def test_fused_experts_that_disagree_with_the_config_are_refused(tiny, tmp_path):
    src = _rewrite(tiny("qwen3_moe_i48", fused=True), tmp_path / "src", lambda n, t: t)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, moe_intermediate_size=32)))
    with pytest.raises(ConvertError, match=r"is BF16\[4, 96, 64\], but .* = \[4, 64, 64\]"):
        convert(str(src), tmp_path / "out", progress=False)
    del config["moe_intermediate_size"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvertError, match="config.json has no moe_intermediate_size"):
        convert(str(src), tmp_path / "out", progress=False)


def test_fused_mixtral_experts_are_refused(tiny, tmp_path):
    # ModelOpt writes them under the in-memory names (mlp.experts.{e}.gate_proj), which no engine's Mixtral reads
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('name = "all"\nextends = "default"\nquantize = ["model.layers.*"]\n')
    with pytest.raises(ConvertError, match=r"fused 3-D expert tensors .* of model_type 'mixtral' have no known"):
        convert(str(tiny("mixtral", fused=True)), tmp_path / "out", recipe_file=recipe, progress=False)


def test_fused_source_calibrates_like_the_per_expert_one(tiny, tmp_path):
    import shutil

    from tiny_models import add_byte_tokenizer

    text = tmp_path / "calib.txt"
    text.write_text("Calibration prose with numbers 1234 and words such as quantization. " * 20)
    outs = {}
    for layout in ("per-expert", "fused"):
        src = add_byte_tokenizer(shutil.copytree(tiny("qwen3_moe_i48", fused=layout == "fused"), tmp_path / layout))
        outs[layout] = load_all(convert(str(src), tmp_path / f"out-{layout}", calibrate=str(text), calib_samples=1,
                                        calib_seq_len=16, progress=False, log=lambda _: None).output)
    scales = [n for n in outs["fused"] if n.endswith(".input_scale")]
    assert len({outs["fused"][n].item() for n in scales}) > 3  # calibrated, not the 1.0 constant
    assert sorted(outs["fused"]) == sorted(outs["per-expert"])
    assert all(raw_bytes(t) == raw_bytes(outs["per-expert"][n]) for n, t in outs["fused"].items())


def test_fused_source_killed_run_resumes_byte_identical(tiny, tmp_path):
    from checks import run_cli, snapshot

    src = tiny("qwen3_moe_i48", fused=True)
    args = ["--max-shard-size", "30KB", "--no-progress", "--backend", "reference"]
    done = run_cli([str(src), str(tmp_path / "ref"), *args])
    assert done.returncode == 0, done.stderr
    killed = run_cli([str(src), str(tmp_path / "out"), *args], kill=("safetensors_io", "ShardWriter.write", 60))
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "out" / "config.json").exists()
    resumed = run_cli([str(src), str(tmp_path / "out"), *args])
    assert resumed.returncode == 0, resumed.stderr
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "ref")
