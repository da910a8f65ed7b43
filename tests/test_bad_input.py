"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing that looks finished."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from checks import assert_one_line_error
from nvfp4_convert import ConvertError
from nvfp4_convert.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, ["convert", *map(str, args), "--no-progress"])
    return result


def checkpoint(folder, tensors=None, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    save_file(tensors or {"model.layers.0.mlp.down_proj.weight": torch.randn(16, 32, dtype=torch.bfloat16)},
              folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def copy_of(tiny, kind, tmp_path):
    return shutil.copytree(tiny(kind), tmp_path / "src")


def test_missing_source(tmp_path):
    assert_one_line_error(run(tmp_path / "nope/x/y", tmp_path / "out"), "nope/x/y")


def test_missing_config(tmp_path):
    src = checkpoint(tmp_path / "src")
    (src / "config.json").unlink()
    assert_one_line_error(run(src, tmp_path / "out"), "config.json is missing")


def test_invalid_config(tmp_path):
    src = checkpoint(tmp_path / "src")
    (src / "config.json").write_text("{not json")
    assert_one_line_error(run(src, tmp_path / "out"), "config.json is not valid JSON")


def test_truncated_shard(tiny, tmp_path):
    src = copy_of(tiny, "llama", tmp_path)
    shard = src / "model-00003-of-00007.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_one_line_error(run(src, tmp_path / "out"), "truncated shard", "model-00003-of-00007")


def test_garbage_shard(tmp_path):
    src = checkpoint(tmp_path / "src")
    (src / "model.safetensors").write_bytes(struct.pack("<Q", 12) + b"not json!!!!" + b"\0" * 64)
    assert_one_line_error(run(src, tmp_path / "out"), "corrupt safetensors header", "model.safetensors")


def test_header_lies_about_sizes(tmp_path):
    src = checkpoint(tmp_path / "src")
    path = src / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8 : 8 + n].replace(b"[16,32]", b"[16,64]")
    path.write_bytes(raw[:8] + header + raw[8 + n :])
    assert_one_line_error(run(src, tmp_path / "out"), "corrupt safetensors header", "offsets span")


def test_index_names_missing_shard(tiny, tmp_path):
    src = copy_of(tiny, "llama", tmp_path)
    (src / "model-00002-of-00007.safetensors").unlink()
    assert_one_line_error(run(src, tmp_path / "out"), "model-00002-of-00007.safetensors", "missing")


def test_shard_name_escaping_the_folder(tiny, tmp_path):
    src = copy_of(tiny, "llama", tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line_error(run(src, tmp_path / "out"), "outside the checkpoint")


def test_duplicate_tensor_names_across_shards(tmp_path):
    src = checkpoint(tmp_path / "src")
    tensors = {"model.layers.0.mlp.down_proj.weight": torch.randn(16, 32, dtype=torch.bfloat16)}
    save_file(tensors, src / "model-00001-of-00002.safetensors")
    save_file(tensors, src / "model-00002-of-00002.safetensors")
    (src / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"model.layers.0.mlp.down_proj.weight": "model-00001-of-00002.safetensors",
                                            "x.weight": "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line_error(run(src, tmp_path / "out"), "duplicate tensor name")


def test_nan_in_weight(tmp_path):
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    w[0, 0] = float("inf")
    src = checkpoint(tmp_path / "src", {"model.layers.0.mlp.down_proj.weight": w})
    result = run(src, tmp_path / "out")
    assert_one_line_error(result, "model.layers.0.mlp.down_proj.weight contains NaN or Inf")
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("how", ["config", "tensor"])
def test_already_quantized(tmp_path, how):
    if how == "config":
        src = checkpoint(tmp_path / "src",
                         config={"model_type": "deepseek_v3", "quantization_config": {"quant_method": "awq"}})
    else:
        src = checkpoint(tmp_path / "src", {"a.weight": torch.zeros(16, 16, dtype=torch.float8_e4m3fn),
                                            "a.weight_scale_inv": torch.ones(1, 1)})
    assert_one_line_error(run(src, tmp_path / "out"), "already quantized")


def test_only_pickle_weights(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle that must never be loaded")
    assert_one_line_error(run(src, tmp_path / "out"), "never unpickled")


def test_disk_full(tiny, tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "out"
    assert_one_line_error(run(tiny("llama"), out), "disk full")
    assert not (out / "config.json").exists() and not list(out.glob("*.safetensors"))


def test_unknown_repo_and_revision(tiny, fake_hub, tmp_path):
    fake_hub.add_repo("org/tiny", tiny("llama"))
    assert_one_line_error(run("org/missing", tmp_path / "a", "--endpoint", fake_hub.url), "org/missing")
    assert_one_line_error(run("org/tiny", tmp_path / "b", "--endpoint", fake_hub.url, "--revision", "nope"), "nope")


def test_gated_repo_needs_token(tiny, fake_hub, tmp_path):
    fake_hub.add_repo("org/gated", tiny("llama"), gated=True)
    result = run("org/gated", tmp_path / "a", "--endpoint", fake_hub.url)
    assert_one_line_error(result, "gated")
    result = run("org/gated", tmp_path / "b", "--endpoint", fake_hub.url, "--token", "hf_secret_value")
    assert result.exit_code == 0, result.output
    assert "hf_secret_value" not in result.output
    for path in (tmp_path / "b").rglob("*"):
        assert not path.is_file() or b"hf_secret_value" not in path.read_bytes(), path


def test_debug_shows_traceback(tmp_path):
    args = ["convert", str(tmp_path / "nope"), str(tmp_path / "out")]
    plain = runner.invoke(app, args)
    assert_one_line_error(plain, "no such folder")
    assert isinstance(plain.exception, SystemExit)  # handled: no traceback
    debug = runner.invoke(app, [*args, "--debug"])
    assert isinstance(debug.exception, ConvertError) and "no such folder" in str(debug.exception)


def _with_header(folder, header: dict | bytes, data: bytes = b"\0" * 64):
    """A checkpoint whose only shard has exactly this JSON header (and ``data`` after it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return folder


W = "model.layers.0.mlp.down_proj.weight"
HEADERS = {
    "nested": b"[" * 100_000 + b"]" * 100_000,
    "nested-entry": b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "entry-not-object": {W: [1, 2, 3]},
    "dtype-list": {W: {"dtype": ["BF16"], "shape": [16, 2], "data_offsets": [0, 64]}},
    "dtype-number": {W: {"dtype": 7, "shape": [16, 2], "data_offsets": [0, 64]}},
    "shape-string": {W: {"dtype": "BF16", "shape": "16x2", "data_offsets": [0, 64]}},
    "shape-floats": {W: {"dtype": "BF16", "shape": [16.0, 2.0], "data_offsets": [0, 64]}},
    "shape-bools": {W: {"dtype": "U8", "shape": [True, 64], "data_offsets": [0, 64]}},
    "shape-huge-with-zero": {W: {"dtype": "BF16", "shape": [0, 2**70], "data_offsets": [0, 0]}, "b": {
        "dtype": "U8", "shape": [64], "data_offsets": [0, 64]}},
    "offsets-strings": {W: {"dtype": "BF16", "shape": [16, 2], "data_offsets": ["0", "64"]}},
    "offsets-floats": {W: {"dtype": "BF16", "shape": [16, 2], "data_offsets": [0.0, 64.0]}},
    "offsets-three": {W: {"dtype": "BF16", "shape": [16, 2], "data_offsets": [0, 32, 64]}},
    "offsets-object": {W: {"dtype": "BF16", "shape": [16, 2], "data_offsets": {"0": 64}}},
    "metadata-list": {"__metadata__": [1], W: {"dtype": "BF16", "shape": [16, 2], "data_offsets": [0, 64]}},
    "lone-surrogate-name": b'{"model.layers.0.\\ud800.weight": '
                           b'{"dtype": "BF16", "shape": [16, 2], "data_offsets": [0, 64]}}',
    "lone-surrogate-metadata": b'{"__metadata__": {"format": "\\udfff"}, "' + W.encode() +
                               b'": {"dtype": "BF16", "shape": [16, 2], "data_offsets": [0, 64]}}',
}


@pytest.mark.parametrize("header", HEADERS.values(), ids=HEADERS.keys())
def test_malformed_header_types(tmp_path, header):
    result = run(_with_header(tmp_path / "src", header), tmp_path / "out")
    assert_one_line_error(result, "model.safetensors")
    assert not (tmp_path / "out" / "config.json").exists()


def test_valid_surrogate_pair_in_a_name_is_fine(tmp_path):
    header = b'{"model.layers.0.\\ud83d\\ude00.weight": {"dtype": "BF16", "shape": [16, 2], "data_offsets": [0, 64]}}'
    result = run(_with_header(tmp_path / "src", header), tmp_path / "out")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name, text", [
    ("config.json", "[" * 100_000 + "]" * 100_000),
    ("config.json", '{"model_type": "llama", "x": "\\ud800"}'),
    ("model.safetensors.index.json", '{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    ("model.safetensors.index.json", '{"weight_map": {"\\udc00": "model.safetensors"}}'),
], ids=["config-nested", "config-surrogate", "index-nested", "index-surrogate"])
def test_malformed_config_and_index(tmp_path, name, text):
    src = checkpoint(tmp_path / "src")
    (src / name).write_text(text)
    assert_one_line_error(run(src, tmp_path / "out"), name)


@pytest.mark.parametrize("threads", ["-1", "0", "100000"])
def test_bad_threads(tmp_path, threads):
    assert_one_line_error(run(checkpoint(tmp_path / "src"), tmp_path / "out", "--threads", threads), "--threads")
