"""End-to-end conversions of tiny random models, checked by recomputation from the source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checks import load_all, recompute_check
from nvfp4_convert import ConvertError, convert
from nvfp4_convert.output import STATE_DIR

FUSED = {
    "llama": [("model.layers.0.self_attn", ("q_proj", "k_proj", "v_proj")),
              ("model.layers.1.mlp", ("gate_proj", "up_proj"))],
    "qwen2_moe": [("model.layers.0.mlp.experts.3", ("gate_proj", "up_proj")),
                  ("model.layers.1.mlp.shared_expert", ("gate_proj", "up_proj"))],
    "qwen3_moe": [("model.layers.1.mlp.experts.0", ("gate_proj", "up_proj"))],
    "mixtral": [("model.layers.1.block_sparse_moe.experts.2", ("w1", "w3"))],
    "deepseek_v3": [("model.layers.0.mlp", ("gate_proj", "up_proj")),
                    ("model.layers.2.mlp.experts.1", ("gate_proj", "up_proj"))],
}


@pytest.mark.parametrize("kind", sorted(FUSED))
def test_every_tensor_recomputes_from_source(kind, tiny, tmp_path):
    src = tiny(kind)
    report = convert(str(src), tmp_path / "out", max_shard_size="30KB", progress=False)
    result = recompute_check(src, tmp_path / "out")
    groups = {tuple(sorted(g)) for g in result["groups"]}
    for parent, leaves in FUSED[kind]:
        assert tuple(sorted(f"{parent}.{leaf}" for leaf in leaves)) in groups
    assert len(report.plan.shards) > 1
    # fused groups straddle source shards in these fixtures: the streaming must still fuse them
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(len({weight_map[f"{m}.weight"] for m in g}) > 1 for g in result["groups"])


def test_layout_dtypes_and_configs(tiny, tmp_path):
    out = tmp_path / "out"
    convert(str(tiny("llama")), out, progress=False)
    tensors = load_all(out)
    w = tensors["model.layers.0.mlp.down_proj.weight"]
    assert w.dtype == torch.uint8 and tuple(w.shape) == (64, 64)
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].dtype == torch.float8_e4m3fn
    assert tuple(tensors["model.layers.0.mlp.down_proj.weight_scale"].shape) == (64, 8)
    assert tensors["model.layers.0.mlp.down_proj.weight_scale_2"].shape == ()
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    hf = json.loads((out / "hf_quant_config.json").read_text())
    assert hf == {
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                         "exclude_modules": ["lm_head", "model.embed_tokens"]},
    }
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "NVFP4"
    assert qc["ignore"] == ["lm_head", "model.embed_tokens"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 16
    assert "input_activations" in qc["config_groups"]["group_0"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # other files copied, source weights never
    assert (out / "tokenizer_config.json").read_text() == (tiny("llama") / "tokenizer_config.json").read_text()
    assert (out / "generation_config.json").exists()
    assert not (out / "README.md").exists()  # the source's card describes the BF16 model; push writes ours


def test_weight_only(tiny, tmp_path):
    out = tmp_path / "out"
    report = convert(str(tiny("qwen3_moe")), out, weight_only=True, progress=False)
    recompute_check(tiny("qwen3_moe"), out, weight_only=True)
    assert "W4A16" in report.activation_policy
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_algo"] == "W4A16_NVFP4" and "input_activations" not in qc["config_groups"]["group_0"]
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "W4A16_NVFP4"


def test_tied_embeddings_stay_tied(tiny, tmp_path):
    src = tiny("llama", tie_word_embeddings=True)
    out = tmp_path / "out"
    convert(str(src), out, progress=False)
    tensors = load_all(out)
    assert "lm_head.weight" not in tensors
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "lm_head" in config["quantization_config"]["ignore"]


def test_dry_run_writes_nothing(tiny, tmp_path):
    report = convert(str(tiny("mixtral")), tmp_path / "out", dry_run=True, progress=False)
    assert not (tmp_path / "out").exists()
    assert report.plan.bytes_out < report.plan.bytes_in
    assert "model.layers.0.block_sparse_moe.gate" in report.plan.exclude_modules


def test_exclude_keeps_whole_fused_group(tiny, tmp_path):
    out = tmp_path / "out"
    lines = []
    report = convert(str(tiny("llama")), out, excludes=["model.layers.0.self_attn.k_proj"], progress=False,
                     log=lines.append)
    tensors = load_all(out)
    for leaf in ("q_proj", "k_proj", "v_proj"):
        assert tensors[f"model.layers.0.self_attn.{leaf}.weight"].dtype == torch.bfloat16
        assert f"model.layers.0.self_attn.{leaf}" in report.plan.exclude_modules
    assert "model.layers.0.self_attn.qkv_proj" in report.plan.exclude_modules
    assert tensors["model.layers.1.self_attn.k_proj.weight"].dtype == torch.uint8
    assert any("share an input" in line for line in lines)
    recompute_check(tiny("llama"), out)


def test_partial_expert_exclusion_keeps_the_layer(tiny, tmp_path):
    lines = []
    report = convert(str(tiny("mixtral")), tmp_path / "out", excludes=["*.experts.1.w2"], dry_run=True, progress=False,
                     log=lines.append)
    assert report.plan.exclude_modules == ["lm_head", "model.embed_tokens", "model.layers.0.block_sparse_moe*",
                                           "model.layers.1.block_sparse_moe*"]  # router and every expert projection
    for layer in (0, 1):
        prefix = f"warning: model.layers.{layer}.block_sparse_moe.experts: "
        assert any(line.startswith(prefix) and "experts.1.w2" in line for line in lines)
    assert not any(".experts." in m for m in report.plan.quantized)


def test_deepseek_keeps_mla_router_and_mtp(tiny, tmp_path):
    report = convert(str(tiny("deepseek_v3")), tmp_path / "out", dry_run=True, progress=False)
    excl = report.plan.exclude_modules
    assert "model.layers.1.mlp.gate" in excl and "model.layers.0.self_attn.q_a_proj" in excl
    assert "model.layers.0.self_attn.fused_qkv_a_proj" in excl
    assert "model.layers.0.self_attn.o_proj" in report.plan.quantized
    assert not any(e.rstrip(".*") == "model.layers.1" for e in excl)  # never a bare layer prefix


def _write_checkpoint(folder, tensors, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_k_not_multiple_of_16_is_kept_with_warning(tmp_path):
    src = _write_checkpoint(tmp_path / "src", {
        "model.layers.0.mlp.down_proj.weight": torch.randn(32, 40, dtype=torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(40, 32, dtype=torch.bfloat16),
    })
    lines = []
    report = convert(str(src), tmp_path / "out", progress=False, log=lines.append)
    assert "model.layers.0.mlp.down_proj" in report.plan.exclude_modules
    assert any("not a multiple of 16" in line for line in lines)
    assert load_all(tmp_path / "out")["model.layers.0.mlp.up_proj.weight"].dtype == torch.uint8


def test_all_zero_weight_and_single_file_source(tmp_path):
    src = _write_checkpoint(tmp_path / "src",
                            {"model.layers.0.mlp.down_proj.weight": torch.zeros(16, 32, dtype=torch.bfloat16)})
    convert(str(src), tmp_path / "out", progress=False)
    t = load_all(tmp_path / "out")
    assert t["model.layers.0.mlp.down_proj.weight"].eq(0).all()
    assert t["model.layers.0.mlp.down_proj.weight_scale"].float().eq(1.0).all()
    assert t["model.layers.0.mlp.down_proj.weight_scale_2"].item() == 1.0


def test_nan_weight_is_named(tmp_path):
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    w[3, 5] = float("nan")
    src = _write_checkpoint(tmp_path / "src", {"model.layers.0.mlp.down_proj.weight": w})
    with pytest.raises(ConvertError, match="model.layers.0.mlp.down_proj.weight contains NaN"):
        convert(str(src), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "config.json").exists()


def test_state_is_hidden_and_complete(tiny, tmp_path):
    out = tmp_path / "out"
    convert(str(tiny("llama")), out, progress=False, command="nvfp4-convert x y")
    state = json.loads((out / STATE_DIR / "state.json").read_text())
    assert state["complete"] and state["info"]["command"] == "nvfp4-convert x y"


def test_cache_snapshot_of_links_converts(tiny, tmp_path):
    """A Hugging Face cache snapshot holds links to blobs outside the folder; it is a valid source."""
    src = tiny("llama")
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        (blobs / f"blob{i}").write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(f"../../blobs/blob{i}")
    convert(str(snapshot), tmp_path / "out", progress=False)
    recompute_check(src, tmp_path / "out")


def test_links_leaving_the_source_folder(tiny, tmp_path):
    """Weight shards may link anywhere; files copied into the output only inside the folder."""
    src, elsewhere, folder = tiny("llama"), tmp_path / "elsewhere", tmp_path / "src"
    elsewhere.mkdir()
    folder.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (elsewhere / f.name).write_bytes(f.read_bytes())
            (folder / f.name).symlink_to(elsewhere / f.name)
        else:
            (folder / "real").mkdir(exist_ok=True)
            (folder / "real" / f.name).write_bytes(f.read_bytes())
            (folder / f.name).symlink_to(Path("real") / f.name)  # a link inside the folder is fine
    convert(str(folder), tmp_path / "out", progress=False)
    recompute_check(src, tmp_path / "out")
    (elsewhere / "secret").write_text("private")
    (folder / "tokenizer.json").symlink_to(elsewhere / "secret")
    with pytest.raises(ConvertError, match="tokenizer.json is a link to .*secret, outside the checkpoint"):
        convert(str(folder), tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def _reciprocal_arithmetic(w, ws2):
    """An approximate backend's arithmetic (products with reciprocals, as FlashInfer's kernels do):
    within tolerance on ordinary weights, garbage where the divisors are subnormal."""
    from nvfp4_convert.kernels.reference import cast_e2m1

    rows, k = w.shape
    blocks = w.float().view(rows, -1, 16)
    s = blocks.abs().amax(-1) * torch.reciprocal(ws2 * 6.0)
    s = torch.where(s == 0, torch.ones_like(s), s).clamp(2**-9, 448).to(torch.float8_e4m3fn)
    codes = cast_e2m1((blocks * torch.reciprocal(s.float() * ws2).unsqueeze(-1)).view(rows, k))
    return (codes[:, 1::2] << 4) | codes[:, 0::2], s


@pytest.mark.parametrize("amax", [1e-45, 1e-44, 1e-40, 2e-38, 1e-36, 3e-35])
def test_denormal_dust_gives_a_valid_checkpoint_with_the_same_bytes_on_every_backend(tmp_path, amax, monkeypatch):
    """A finite tensor whose max|W| is so small that amax/2688 is subnormal or 0 still gets a normal
    global scale (its floor, 2^-126) and the same bytes whatever the backend, and verify accepts it."""
    from nvfp4_convert import kernels
    from nvfp4_convert.kernels.common import GLOBAL_SCALE_MIN
    from nvfp4_convert.verify import verify

    monkeypatch.setitem(kernels._REGISTRY, "approx", kernels.Backend(
        name="approx", quantize=_reciprocal_arithmetic, amax=kernels.reference.amax, exact=False, device="cpu"))
    g = torch.Generator().manual_seed(1)
    tensors = {"model.layers.0.mlp.down_proj.weight": (torch.rand(32, 64, generator=g) * 2 - 1) * amax,
               "model.layers.0.mlp.up_proj.weight": (torch.randn(32, 64, generator=g) * amax).to(torch.bfloat16)}
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = amax
    src = _write_checkpoint(tmp_path / "src", tensors)
    outputs = []
    for backend in ("reference", "cpu", "approx"):
        out = tmp_path / backend
        convert(str(src), out, backend=backend, progress=False)
        report = verify(out, source=str(src), progress=False)
        assert report.ok, [v.line() for v in report.violations]
        ws2 = load_all(out)["model.layers.0.mlp.down_proj.weight_scale_2"].item()
        assert ws2 == max(GLOBAL_SCALE_MIN, torch.tensor(amax).item() * INV)
        outputs.append({p.name: p.read_bytes() for p in out.glob("*.safetensors")})
    assert outputs[0] == outputs[1] == outputs[2]


INV = float.fromhex("0x1.861862p-12")


def test_fused_3d_experts_of_unknown_layout_are_refused(tmp_path):
    src = _write_checkpoint(tmp_path / "src", {
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 64, 32, dtype=torch.bfloat16),
        "model.layers.0.mlp.experts.down_proj": torch.randn(4, 32, 32, dtype=torch.bfloat16),
        "model.layers.0.mlp.gate.weight": torch.randn(4, 32, dtype=torch.bfloat16),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(32, 32, dtype=torch.bfloat16),
    })
    (src / "config.json").write_text(json.dumps({"model_type": "some_moe"}))  # the default recipe quantizes them
    with pytest.raises(ConvertError, match="fused 3-D expert tensors .* of model_type 'some_moe' have no known"):
        convert(str(src), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "config.json").exists()
    lines = []  # excluded, they stay as they are, with a warning
    convert(str(src), tmp_path / "kept", excludes=["*.experts.*"], progress=False, log=lines.append)
    assert any("2 fused 3-D expert tensors" in line and "stay BF16" in line for line in lines)
    recompute_check(src, tmp_path / "kept")
