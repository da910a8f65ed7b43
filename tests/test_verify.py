"""`nvfp4-convert verify`: clean conversions pass; each planted defect is reported in one clear line."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nvfp4_convert import convert
from nvfp4_convert.cli import app
from nvfp4_convert.safetensors_io import read_header
from nvfp4_convert.sources import open_source
from nvfp4_convert.verify import verify

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Tiny sources (the shared ones: never modified here) and their conversions (several output shards each)."""
    root = tmp_path_factory.mktemp("converted")
    pairs = {}
    for kind in ("llama", "qwen2_moe", "mixtral", "deepseek_v3"):
        src = tiny(kind)
        out = root / f"{kind}-nvfp4"
        convert(str(src), out, backend="reference", max_shard_size="40KB", progress=False)
        pairs[kind] = (src, out)
    return pairs


@pytest.fixture
def llama(converted, tmp_path) -> tuple[Path, Path]:
    """A private copy of the converted Llama, free to tamper with."""
    src, out = converted["llama"]
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return src, copy


def _locate(out: Path, name: str) -> tuple[Path, int]:
    """The shard holding ``name`` and the file offset of its first byte."""
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    path = out / weight_map[name]
    header = read_header(path)
    return path, header.data_start + header.tensors[name].data_offsets[0]


def _poke(out: Path, name: str, data: bytes, at: int = 0) -> None:
    path, offset = _locate(out, name)
    with open(path, "r+b") as f:
        f.seek(offset + at)
        f.write(data)


def _peek(out: Path, name: str, at: int = 0, n: int = 1) -> bytes:
    path, offset = _locate(out, name)
    with open(path, "rb") as f:
        f.seek(offset + at)
        return f.read(n)


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc, indent=2))


def _lines(report) -> list[str]:
    return [v.line() for v in report.violations]


# -- clean conversions ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2_moe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("with_source", [False, True])
def test_fresh_conversion_verifies_clean(converted, kind, with_source):
    src, out = converted[kind]
    report = verify(out, source=str(src) if with_source else None, progress=False)
    assert report.ok, _lines(report)
    assert report.quant_algo == "NVFP4"
    assert report.checked["tensor layout"] == len(report.quantized) > 0
    assert report.checked["fusion groups"] > 0 and report.checked["exclusions"] > 0
    if kind != "llama":
        assert report.checked["MoE experts"] == 2
    if with_source:
        assert len(report.layers) == len(report.quantized)
        assert report.identical == len(report.kept) > 0
        assert all(15 < x.sqnr_db < 30 and x.max_code_distance == 0 for x in report.layers)
    else:
        assert report.layers == [] and report.source is None


def test_source_shards_are_held_one_at_a_time(converted, monkeypatch):
    import nvfp4_convert.verify.compare as compare_module

    held: set[str] = set()
    acquired: list[str] = []
    peak = 0

    def spying_open_source(*args, **kwargs):
        source = open_source(*args, **kwargs)
        acquire, release = source.acquire, source.release

        def spy_acquire(name):
            nonlocal peak
            held.add(name)
            acquired.append(name)
            peak = max(peak, len(held))
            return acquire(name)

        def spy_release(name):
            held.discard(name)
            release(name)

        source.acquire, source.release = spy_acquire, spy_release
        return source

    monkeypatch.setattr(compare_module, "open_source", spying_open_source)
    src, out = converted["llama"]
    assert verify(out, source=str(src), progress=False).ok
    assert peak == 1 and not held
    assert len(acquired) == len(set(acquired)) == len(list(src.glob("*.safetensors"))) > 1


def test_cli_clean_writes_json_and_plots(converted, tmp_path):
    src, out = converted["llama"]
    result = CliRunner().invoke(app, ["verify", str(out), "--source", str(src), "--json", str(tmp_path / "v.json"),
                                      "--plots", str(tmp_path / "plots"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "verdict:    PASS" in result.output and "violation" not in result.output
    doc = json.loads((tmp_path / "v.json").read_text())
    assert doc["ok"] is True and doc["violations"] == [] and len(doc["layers"]) == doc["quantized_modules"]
    assert sum(doc["e2m1_code_counts"]) > 0 and doc["sqnr_db"]["median"] > 15
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "block_scales.png", "e2m1_codes.png", "sqnr_histogram.png", "sqnr_per_layer.png"]


def test_plots_without_matplotlib_is_one_clear_error(converted, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    result = CliRunner().invoke(app, ["verify", str(converted["llama"][1]), "--plots", str(tmp_path), "--no-progress"])
    assert result.exit_code == 2
    assert "error: plots need matplotlib" in result.output and "nvfp4-convert[plot]" in result.output


def test_missing_output_folder_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "output folder not found" in result.output


# -- planted defects -----------------------------------------------------------------------------


@pytest.mark.parametrize(("byte", "kind"), [(0x7F, "NaN"), (0xFF, "NaN"), (0x00, "zero")])
def test_flipped_block_scale_byte(llama, byte, kind):
    _, out = llama
    _poke(out, f"{Q}.weight_scale", bytes([byte]), at=5)
    report = verify(out, progress=False)
    assert _lines(report) == [f"1 block scale(s) {kind} (first: byte 0x{byte:02X} at row 1, block 1) "
                              f"({Q}.weight_scale)"]
    result = CliRunner().invoke(app, ["verify", str(out), "--no-progress"])
    assert result.exit_code == 1
    assert f"violation: 1 block scale(s) {kind}" in result.output and "FAIL" in result.output


def test_mismatched_fused_weight_scale_2(llama):
    _, out = llama
    _poke(out, f"{K}.weight_scale_2", struct.pack("<f", 0.123))
    (line,) = _lines(verify(out, progress=False))
    assert line.startswith("fused modules have different weight_scale_2: ") and "k_proj=0.123" in line
    assert line.endswith("(model.layers.0.self_attn)")


@pytest.mark.parametrize("value, why", [(0.0, "expected a positive finite number"),
                                        (1e-40, "below the smallest normal float32")])
def test_zero_or_subnormal_weight_scale_2(llama, value, why):
    _, out = llama
    down = "model.layers.1.mlp.down_proj"
    _poke(out, f"{down}.weight_scale_2", struct.pack("<f", value))
    lines = _lines(verify(out, progress=False))
    assert any(why in line and f"{down}.weight_scale_2" in line for line in lines), lines


def test_missing_input_scale(llama):
    _, out = llama
    name = f"{K}.input_scale"
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = out / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    index["metadata"]["total_size"] -= 4
    index_path.write_text(json.dumps(index))
    assert _lines(verify(out, progress=False)) == [f"input_scale is missing ({K})"]


def _add_exclusion(out, entry):
    """List ``entry`` in both config files, consistently."""
    _edit_json(out / "hf_quant_config.json", lambda d: d["quantization"]["exclude_modules"].append(entry))
    _edit_json(out / "config.json", lambda d: d["quantization_config"]["ignore"].append(entry))


def test_excluded_layer_quantized(llama):
    _, out = llama
    _add_exclusion(out, Q)
    assert _lines(verify(out, progress=False)) == [
        f"{Q} is listed in exclude_modules ({Q!r}) but quantized (exclude_modules)"]


def test_exclusion_in_one_file_only(llama):
    _, out = llama
    _edit_json(out / "hf_quant_config.json", lambda d: d["quantization"]["exclude_modules"].append(Q))
    lines = _lines(verify(out, progress=False))
    assert "config.json ignore differs from hf_quant_config.json exclude_modules (config files)" in lines


def test_exclusion_that_is_a_substring_of_a_quantized_module(llama):
    _, out = llama
    entry = "model.layers.0.self_attn.q"
    _add_exclusion(out, entry)
    assert _lines(verify(out, progress=False)) == [
        f"exclusion {entry!r} is a substring of quantized {Q}; vLLM would skip it (exclude_modules)"]


def test_config_contract(llama):
    _, out = llama
    _edit_json(out / "hf_quant_config.json",
               lambda d: d["quantization"].update(group_size=32, kv_cache_quant_algo="FP8"))
    _edit_json(out / "config.json", lambda d: d["quantization_config"].update(quant_method="fp4"))
    lines = _lines(verify(out, progress=False))
    assert "group_size is 32, not 16 (hf_quant_config.json)" in lines
    assert "kv_cache_quant_algo is 'FP8', expected null (hf_quant_config.json)" in lines
    assert "quant_method is 'fp4', not 'modelopt' (config.json quantization_config)" in lines


def test_index_points_at_wrong_shard(llama):
    _, out = llama
    name = f"{Q}.weight"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    right = index["weight_map"][name]
    wrong = next(s for s in sorted(set(index["weight_map"].values())) if s != right)
    _edit_json(out / "model.safetensors.index.json", lambda d: d["weight_map"].update({name: wrong}))
    assert _lines(verify(out, progress=False)) == [
        f"the index puts {name} in {wrong}, but it is in {right} (model.safetensors.index.json)"]


def test_missing_shard(llama):
    _, out = llama
    shard, _ = _locate(out, f"{Q}.weight")
    shard.unlink()
    lines = _lines(verify(out, progress=False))
    assert lines[0].startswith(f"the index names shard {shard.name} (")
    assert lines[0].endswith(" tensors), which is missing (model.safetensors.index.json)")
    assert len(lines) < 10  # one line for the shard, not one per tensor


def test_stray_shard(llama):
    _, out = llama
    save_file({"x": torch.zeros(2)}, out / "consolidated.safetensors")
    assert _lines(verify(out, progress=False)) == [
        "stray shard consolidated.safetensors is not in the index (engines may load it twice) "
        "(consolidated.safetensors)"]


def test_corrupted_packed_byte_is_an_error_outlier(llama):
    src, out = llama
    name = f"{Q}.weight"
    _poke(out, name, bytes([_peek(out, name, at=70)[0] ^ 0xFF]), at=70)
    assert verify(out, progress=False).ok  # the format is intact; only the values are wrong
    report = verify(out, source=str(src), progress=False)
    (line,) = _lines(report)
    assert line.startswith("error outlier: a code is 7 E2M1 steps from the rounding of the source value (row 2,")
    assert line.endswith(f"({Q})")
    result = CliRunner().invoke(app, ["verify", str(out), "--source", str(src), "--no-progress"])
    assert result.exit_code == 1 and "violation: error outlier" in result.output


def test_changed_kept_tensor_is_caught(llama):
    src, out = llama
    _poke(out, "model.norm.weight", b"\x00\x00")
    assert _lines(verify(out, source=str(src), progress=False)) == [
        "differs from the source (first difference in bytes 0-128) (model.norm.weight)"]


def test_moe_experts_in_mixed_formats(converted, tmp_path):
    src, out = converted["qwen2_moe"]
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    # Replace one expert's NVFP4 tensors by a BF16 weight and exclude it, as a faulty tool might.
    module = "model.layers.0.mlp.experts.1.down_proj"
    index_path = copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = copy / index["weight_map"][f"{module}.weight"]
    tensors = load_file(shard)
    for suffix in (".weight", ".weight_scale", ".weight_scale_2", ".input_scale"):
        tensors.pop(module + suffix)
        index["weight_map"].pop(module + suffix)
    tensors[f"{module}.weight"] = torch.zeros(64, 32, dtype=torch.bfloat16)
    index["weight_map"][f"{module}.weight"] = shard.name
    save_file(tensors, shard, metadata={"format": "pt"})
    index["metadata"]["total_size"] = _total(copy, index)
    index_path.write_text(json.dumps(index))
    for path, key in (("hf_quant_config.json", ("quantization", "exclude_modules")),
                      ("config.json", ("quantization_config", "ignore"))):
        _edit_json(copy / path, lambda d, k=key: d[k[0]][k[1]].append(module))
    assert _lines(verify(copy, progress=False)) == [
        "experts of one MoE layer mix NVFP4 and unquantized weights (model.layers.0.mlp.experts)"]


def _total(out: Path, index: dict) -> int:
    return sum(t.nbytes for s in set(index["weight_map"].values()) for t in read_header(out / s).tensors.values())


def test_sqnr_outliers_are_flagged():
    from nvfp4_convert.verify.compare import LayerError, flag_outliers

    def layers(*dbs):
        return [LayerError(f"m{i}", (16, 16), db, 0.1, 0) for i, db in enumerate(dbs)]

    floor = layers(20.0, 20.5, 19.8, 11.0, 20.2, float("nan"))
    flag_outliers(floor)
    assert [x.outlier for x in floor] == [
        None, None, None, "SQNR 11.0 dB is below the 12 dB floor", None, "dequantizes to NaN or Inf"]
    drop = layers(30.0, 30.5, 29.8, 21.0, 30.2)
    flag_outliers(drop)
    assert [x.outlier for x in drop] == [None, None, None, "SQNR 21.0 dB is far below the median 30.0 dB", None]
