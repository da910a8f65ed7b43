"""FP8 sources (DeepSeek-style block FP8, per-tensor FP8): dequantized exactly, then quantized."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file

from checks import load_all, recompute_check, snapshot
from nvfp4_convert import ConvertError, convert
from tiny_models import _save_sharded, add_mtp_layer, expected_source, fp8_quantize, make_fp8


def _in_layers_not_router(name: str) -> bool:
    return name.startswith("model.layers.") and ".mlp.gate." not in name and "shared_head.head" not in name \
        and "embed_tokens" not in name


@pytest.fixture(scope="module")
def fp8_models(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    deepseek = add_mtp_layer(tiny("deepseek_v3"), root / "deepseek-bf16")
    models = {}
    # partial edge blocks along K (64 = 48 + 16) for DeepSeek; whole blocks for Qwen3-MoE
    for kind, src, block in (("deepseek_v3", deepseek, (32, 48)), ("qwen3_moe", tiny("qwen3_moe"), (16, 32))):
        fp8 = make_fp8(src, root / f"{kind}-fp8", block=block, is_fp8=_in_layers_not_router)
        models[kind] = (fp8, expected_source(fp8, root / f"{kind}-expected", block))
    return models


@pytest.mark.parametrize("kind", ["deepseek_v3", "qwen3_moe"])
def test_fp8_source_equals_dequantize_then_quantize(kind, fp8_models, tmp_path):
    fp8, expected = fp8_models[kind]
    weight_map = json.loads((fp8 / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(weight_map[n] != weight_map[n[: -len("_scale_inv")]] for n in weight_map if n.endswith("_scale_inv"))
    report = convert(str(fp8), tmp_path / "out", max_shard_size="30KB", progress=False)
    result = recompute_check(expected, tmp_path / "out")  # quantized: from the dequantized BF16; kept: identical
    assert report.plan.fp8_flavour.startswith("block FP8")
    tensors = load_all(tmp_path / "out")
    assert not any(n.endswith("_scale_inv") for n in tensors)
    assert not any(t.dtype == torch.float8_e4m3fn for n, t in tensors.items() if not n.endswith(".weight_scale"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert "weight_block_size" not in json.dumps(config) and "fmt" not in config["quantization_config"]
    assert len(result["quantized"]) > 10
    if kind == "deepseek_v3":
        excl = report.plan.exclude_modules
        kept_fp8 = "model.layers.1.self_attn.kv_a_proj_with_mqa"  # MLA: FP8 in the source, BF16 out
        assert kept_fp8 in excl and tensors[f"{kept_fp8}.weight"].dtype == torch.bfloat16
        assert "model.layers.3.mlp.experts.0.gate_proj" not in report.plan.quantized  # the MTP layer stays BF16
        assert tensors["model.layers.3.mlp.experts.0.gate_proj.weight"].dtype == torch.bfloat16
        assert tensors["model.layers.3.eh_proj.weight"].dtype == torch.bfloat16
        assert "model.layers.2.mlp.experts.1.down_proj" in report.plan.quantized


def test_fp8_hub_conversion_equals_local(fp8_models, fake_hub, tmp_path):
    fp8, _ = fp8_models["deepseek_v3"]
    fake_hub.add_repo("org/tiny-deepseek-fp8", fp8)
    convert(str(fp8), tmp_path / "local", max_shard_size="30KB", progress=False)
    convert("org/tiny-deepseek-fp8", tmp_path / "hub", endpoint=fake_hub.url, work_dir=tmp_path / "work",
            max_shard_size="30KB", progress=False)
    assert snapshot(tmp_path / "hub") == snapshot(tmp_path / "local")


def test_fp8_weight_larger_than_the_memory_budget(fp8_models, tmp_path, monkeypatch):
    """Units too large to hold are dequantized one row chunk at a time: same bytes."""
    from nvfp4_convert import pipeline

    fp8, _ = fp8_models["qwen3_moe"]
    convert(str(fp8), tmp_path / "whole", progress=False)
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 700)  # not a multiple of the 16-row block: partial blocks
    monkeypatch.setattr(pipeline, "BUDGET_LARGEST", 0)
    monkeypatch.setattr(pipeline, "MIN_BUDGET_BYTES", 0)
    loads = []
    original = pipeline._load
    monkeypatch.setattr(pipeline, "_load", lambda *a: loads.append(original(*a)) or loads[-1])
    convert(str(fp8), tmp_path / "chunked", progress=False)
    assert loads and all(x is None for x in loads)  # nothing held whole
    assert snapshot(tmp_path / "chunked") == snapshot(tmp_path / "whole")


def _single(tmp_path, tensors, qc, name="src"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


BLOCK_QC = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16], "activation_scheme": "dynamic"}
W = "model.layers.0.mlp.down_proj"


def _fp8_tensors(rows=32, cols=48, block=(16, 16)):
    weight, scale = fp8_quantize(torch.randn(rows, cols, dtype=torch.bfloat16), block)
    return {f"{W}.weight": weight, f"{W}.weight_scale_inv": scale}


def test_per_tensor_fp8_drops_activation_scales(tmp_path):
    weight = torch.randn(32, 48, dtype=torch.bfloat16)
    scale = weight.float().abs().amax() / 448
    tensors = {f"{W}.weight": (weight.float() / scale).to(torch.float8_e4m3fn), f"{W}.weight_scale": scale.reshape(1),
               f"{W}.input_scale": torch.tensor([0.5])}
    src = _single(tmp_path, tensors, {"quant_method": "fp8", "activation_scheme": "static"})
    lines = []
    report = convert(str(src), tmp_path / "out", progress=False, log=lines.append)
    assert report.plan.fp8_flavour == "FP8 per-tensor" and any("dropped" in line for line in lines)
    expected = tmp_path / "expected"
    expected.mkdir()
    deq = (tensors[f"{W}.weight"].float() * scale).to(torch.bfloat16)
    save_file({f"{W}.weight": deq}, expected / "model.safetensors")
    (expected / "config.json").write_text("{}")
    recompute_check(expected, tmp_path / "out")


def _refused(tmp_path, tensors, qc, match):
    src = _single(tmp_path, tensors, qc)
    with pytest.raises(ConvertError, match=match) as info:
        convert(str(src), tmp_path / "out", progress=False)
    assert "\n" not in str(info.value.what)
    assert not (tmp_path / "out" / "config.json").exists()


def test_missing_scale_is_refused(tmp_path):
    tensors = _fp8_tensors()
    del tensors[f"{W}.weight_scale_inv"]
    _refused(tmp_path, tensors, BLOCK_QC, "has no weight_scale_inv")


def test_extra_scale_is_refused(tmp_path):
    tensors = _fp8_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.randn(48, 32, dtype=torch.bfloat16)
    tensors["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(3, 2)
    _refused(tmp_path, tensors, BLOCK_QC, "belongs to no FP8 weight")


def test_scale_shape_that_does_not_fit_the_block_is_refused(tmp_path):
    tensors = _fp8_tensors()  # 32x48 in 16x16 blocks needs [2, 3]
    _refused(tmp_path, tensors, {**BLOCK_QC, "weight_block_size": [128, 128]}, r"needs \[1, 1\]")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_scale_is_refused(tmp_path, bad):
    tensors = _fp8_tensors()
    tensors[f"{W}.weight_scale_inv"][1, 2] = bad
    _refused(tmp_path, tensors, BLOCK_QC, "holds NaN or Inf")


@pytest.mark.parametrize("qc, match", [
    ({"quant_method": "compressed-tensors", "format": "float-quantized"},
     r"compressed-tensors sources \(float-quantized\)"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "already quantized .quant_method=modelopt, quant_algo=NVFP4"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "FP8 format 'e5m2'"),
    ({"quant_method": "gptq"}, "already quantized .quant_method=gptq"),
])
def test_other_flavours_are_refused_with_one_line(tmp_path, qc, match):
    _refused(tmp_path, {f"{W}.weight": torch.randn(32, 48, dtype=torch.bfloat16)}, qc, match)


def test_fp8_config_without_fp8_weights_is_refused(tmp_path):
    _refused(tmp_path, {f"{W}.weight": torch.randn(32, 48, dtype=torch.bfloat16)}, BLOCK_QC,
             "declares block FP8 16x16, but no tensor is FP8")


def test_fp8_weight_without_fp8_config_is_refused(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file(_fp8_tensors(), folder / "model.safetensors")
    with pytest.raises(ConvertError, match="already quantized"):
        convert(str(folder), tmp_path / "out", progress=False)
    shutil.rmtree(folder)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("chunked", [False, True])
def test_fp8_dequantized_on_the_gpu_equals_cpu(tmp_path, monkeypatch, chunked):
    """FP8 weights go to the GPU as FP8 and are dequantized there: same bytes as on the CPU."""
    from nvfp4_convert import pipeline

    gen = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(512, 256, generator=gen).to(torch.bfloat16)}
    for i in range(2):
        for name, shape in {"self_attn.q_proj": (256, 256), "self_attn.k_proj": (64, 256),
                            "self_attn.v_proj": (64, 256), "self_attn.o_proj": (256, 256), "mlp.gate_proj": (704, 256),
                            "mlp.up_proj": (704, 256), "mlp.down_proj": (256, 704)}.items():
            w = torch.randn(*shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 0.05
            key = f"model.layers.{i}.{name}.weight"
            tensors[key], tensors[f"{key}_scale_inv"] = fp8_quantize(w.to(torch.bfloat16), (128, 128))
    config = {"model_type": "llama", "num_hidden_layers": 2,
              "quantization_config": {**BLOCK_QC, "weight_block_size": [128, 128]}}
    _save_sharded(tmp_path / "src", tensors, config, 300_000)
    src = str(tmp_path / "src")
    convert(src, tmp_path / "cpu", backend="reference", max_shard_size="300KB", progress=False)
    if chunked:  # nothing held whole: row chunks dequantized one at a time, on the host
        monkeypatch.setattr(pipeline, "BUDGET_LARGEST", 0)
        monkeypatch.setattr(pipeline, "MIN_BUDGET_BYTES", 0)
    report = convert(src, tmp_path / "gpu", backend="triton", max_shard_size="300KB", progress=False)
    assert report.backend == "triton"
    assert snapshot(tmp_path / "gpu") == snapshot(tmp_path / "cpu")


def test_fp8_killed_run_resumes_byte_identical(fp8_models, tmp_path):
    from checks import run_cli

    fp8, _ = fp8_models["deepseek_v3"]
    args = ["--max-shard-size", "30KB", "--no-progress"]
    done = run_cli([str(fp8), str(tmp_path / "ref"), *args])
    assert done.returncode == 0, done.stderr
    killed = run_cli([str(fp8), str(tmp_path / "out"), *args], kill=("safetensors_io", "ShardWriter.write", 40))
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "out" / "config.json").exists()
    resumed = run_cli([str(fp8), str(tmp_path / "out"), *args])
    assert resumed.returncode == 0, resumed.stderr
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "ref")


@pytest.mark.parametrize("kind", ["deepseek_v3", "qwen3_moe"])
def test_verify_against_an_fp8_source_equals_against_its_dequantization(kind, fp8_models, tmp_path):
    from nvfp4_convert.verify import verify

    fp8, expected = fp8_models[kind]
    report = convert(str(fp8), tmp_path / "out", max_shard_size="30KB", progress=False)
    against_fp8 = verify(tmp_path / "out", source=str(fp8), progress=False)
    against_bf16 = verify(tmp_path / "out", source=str(expected), progress=False)
    assert against_fp8.ok, [v.line() for v in against_fp8.violations]
    assert len(against_fp8.layers) == len(report.plan.quantized) > 10
    def by_module(report):
        return sorted(report.layers, key=lambda x: x.module)

    assert by_module(against_fp8) == by_module(against_bf16)  # every error figure, from the same BF16 weights
    assert against_fp8.checked == against_bf16.checked and against_fp8.identical == against_bf16.identical


def _scaled(fp8, dst, factors: dict[str, float]):
    """A copy of FP8 checkpoint ``fp8`` with the first block scale of each named weight multiplied."""
    from safetensors.torch import load_file

    shutil.copytree(fp8, dst)
    for shard in dst.glob("*.safetensors"):
        tensors = load_file(shard)
        if hit := [n for n in factors if f"{n}_scale_inv" in tensors]:
            for n in hit:
                tensors[f"{n}_scale_inv"][0, 0] *= factors[n]
            save_file(tensors, shard, metadata={"format": "pt"})
    return dst


def test_verify_against_an_fp8_source_finds_what_differs(fp8_models, fake_hub, tmp_path):
    from nvfp4_convert.verify import verify

    fp8, _ = fp8_models["deepseek_v3"]
    convert(str(fp8), tmp_path / "out", max_shard_size="30KB", progress=False)
    fake_hub.add_repo("org/tiny-deepseek-fp8", fp8)  # scales in other shards are fetched from the Hub too
    hub = verify(tmp_path / "out", source="org/tiny-deepseek-fp8", endpoint=fake_hub.url, progress=False)
    assert hub.ok and hub.layers == verify(tmp_path / "out", source=str(fp8), progress=False).layers
    kept, quantized = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.2.mlp.experts.1.down_proj"
    other = _scaled(fp8, tmp_path / "other", {kept: 2.0, quantized + ".weight": 8.0})
    found = verify(tmp_path / "out", source=str(other), progress=False)
    lines = [v.line() for v in found.violations]
    assert not found.ok and len(lines) == 2, lines
    assert any(kept in line and "BF16 dequantization" in line for line in lines), lines
    assert any(quantized in line and "outlier" in line for line in lines), lines
