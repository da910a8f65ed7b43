"""Interrupted runs resume to byte-identical output; other conversions are never mixed in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from checks import FAST, run_cli, snapshot
from nvfp4_convert import ConvertError, convert
from nvfp4_convert.output import read_conversion_info


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    src = tiny("qwen2_moe")
    out = tmp_path_factory.mktemp("ref") / "out"
    result = run_cli([str(src), str(out), "--max-shard-size", "20KB", *FAST])
    assert result.returncode == 0, result.stderr
    return src, snapshot(out)


@pytest.mark.parametrize("kill", [
    ("safetensors_io", "ShardWriter.write", 1),      # first tensor of the first shard
    ("safetensors_io", "ShardWriter.write", 37),     # in the middle of a shard
    ("safetensors_io", "ShardWriter.commit", 2),     # right before the second shard is renamed
    ("output", "OutputDir.record", 3),               # shard renamed, not yet recorded
    ("output", "copy_atomic", 2),                    # while copying tokenizer/config files
    ("output", "write_json_atomic", 3),              # between the index and the config files
])
def test_killed_run_resumes_byte_identical(kill, reference_run, tmp_path):
    src, expected = reference_run
    out = tmp_path / "out"
    args = [str(src), str(out), "--max-shard-size", "20KB", *FAST]
    killed = run_cli(args, kill=kill)
    assert killed.returncode == -9, killed.stderr
    assert not (out / "config.json").exists() or kill[1] == "write_json_atomic"
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr
    assert snapshot(out) == expected
    assert read_conversion_info(out) is not None


def test_resume_skips_finished_shards_and_redoes_damaged_ones(tiny, tmp_path):
    src, out = tiny("llama"), tmp_path / "out"
    convert(str(src), out, max_shard_size="30KB", progress=False)
    before = snapshot(out)
    shard = out / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    report = convert(str(src), out, max_shard_size="30KB", progress=False)
    assert shard.name not in report.skipped_shards and len(report.skipped_shards) == 3
    assert snapshot(out) == before


def test_other_conversion_is_refused_unless_overwrite(tiny, tmp_path):
    out = tmp_path / "out"
    convert(str(tiny("llama")), out, progress=False)
    with pytest.raises(ConvertError, match="holds another conversion"):
        convert(str(tiny("llama")), out, weight_only=True, progress=False)
    convert(str(tiny("llama")), out, weight_only=True, overwrite=True, progress=False)
    assert b"W4A16_NVFP4" in (out / "hf_quant_config.json").read_bytes()


def test_unrelated_folder_is_refused(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="holds 1 entry .notes.txt. that no conversion wrote"):
        convert(str(tiny("llama")), out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def _replace_weights(src: Path, other: Path, *, keep_mtime: bool) -> None:
    """Give ``src`` the shards of ``other`` (same shapes, other values), optionally with the old mtimes."""
    for shard in sorted(src.glob("*.safetensors")):
        stat = shard.stat()
        shard.write_bytes((other / shard.name).read_bytes())
        if keep_mtime:
            os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["new-mtime", "same-mtime"])
def test_changed_source_weights_are_redone_after_a_finished_run(tiny, tmp_path, keep_mtime):
    import shutil

    from checks import recompute_check

    src = Path(shutil.copytree(tiny("llama"), tmp_path / "src"))
    other = tiny("llama", seed=1)
    out = tmp_path / "out"
    convert(str(src), out, max_shard_size="30KB", progress=False)
    _replace_weights(src, other, keep_mtime=keep_mtime)
    report = convert(str(src), out, max_shard_size="30KB", progress=False)
    assert report.skipped_shards == []
    recompute_check(other, out)
    assert convert(str(src), out, max_shard_size="30KB", progress=False).skipped_shards  # unchanged: kept


def test_changed_source_after_a_kill_resumes_without_mixing(tiny, tmp_path):
    import shutil

    src = Path(shutil.copytree(tiny("qwen2_moe"), tmp_path / "src"))
    other = tiny("qwen2_moe", seed=1)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    args = [str(src), str(out), "--max-shard-size", "20KB", *FAST]
    killed = run_cli(args, kill=("safetensors_io", "ShardWriter.commit", 3))
    assert killed.returncode == -9, killed.stderr
    _replace_weights(src, other, keep_mtime=False)
    assert run_cli(args).returncode == 0
    assert run_cli([str(other), str(fresh), "--max-shard-size", "20KB", *FAST]).returncode == 0
    assert snapshot(out) == snapshot(fresh)


def test_hub_source_changed_in_one_shard_redoes_only_what_it_feeds(tiny, fake_hub, tmp_path):
    import shutil

    from checks import recompute_check
    from nvfp4_convert.sources import LocalSource

    served = Path(shutil.copytree(tiny("llama"), tmp_path / "served"))
    fake_hub.add_repo("org/tiny", served)
    out = tmp_path / "out"
    kwargs = dict(endpoint=fake_hub.url, max_shard_size="30KB", progress=False)
    first = convert("org/tiny", out, **kwargs)
    assert first.skipped_shards == []
    changed = LocalSource(served).shards[-1]
    (served / changed).write_bytes((tiny("llama", seed=1) / changed).read_bytes())
    fake_hub.add_repo("org/tiny", served)  # a new commit on main
    again = convert("org/tiny", out, **kwargs)
    redone = {s.filename for s in again.plan.shards} - set(again.skipped_shards)
    feeds = {s.filename for s in again.plan.shards if any(changed in u.sources for u in s.units)}
    assert redone == feeds and 0 < len(feeds) < len(again.plan.shards)
    recompute_check(served, out)
