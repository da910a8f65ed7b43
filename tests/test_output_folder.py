"""The output folder never costs the user data: no overlap with the source, --overwrite replaces only a
previous conversion's files and only once the new one is complete, one conversion at a time."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from checks import recompute_check
from nvfp4_convert import ConvertError, convert
from nvfp4_convert.output import STATE_DIR, OutputDir, read_conversion_info


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links followed), by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def src(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny("llama"), tmp_path / "src"))


def _inside(src: Path, tmp: Path) -> Path:
    return src / "nested" / "out"


def _holder(src: Path, tmp: Path) -> Path:
    return src.parent


def _link_to_src(src: Path, tmp: Path) -> Path:
    (tmp / "link").symlink_to(src)
    return tmp / "link"


def _link_to_holder(src: Path, tmp: Path) -> Path:
    (tmp / "up").symlink_to(src.parent)
    return tmp / "up"


@pytest.mark.parametrize("where", [lambda s, t: s, _inside, _holder, _link_to_src, _link_to_holder],
                         ids=["same", "out-inside-src", "out-holds-src", "out-links-to-src", "out-links-above-src"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_overlapping_the_source_is_refused(src, tmp_path, where, overwrite):
    before = tree(src)
    out = where(src, tmp_path)
    with pytest.raises(ConvertError, match="the output folder (is|holds|is inside) the source folder"):
        convert(str(src), out, overwrite=overwrite, progress=False)
    assert tree(src) == before
    assert not (src / "nested").exists()


def test_output_holding_linked_source_files_is_refused(src, tmp_path):
    """A cache snapshot's links point into a blobs folder; writing into that folder is an overlap too."""
    repo = tmp_path / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        shutil.move(f, blobs / f.name)
        (snapshot / f.name).symlink_to(blobs / f.name)
    before = tree(blobs)
    with pytest.raises(ConvertError, match=r"holds the source file .* \(through a link\)"):
        convert(str(snapshot), blobs, overwrite=True, progress=False)
    assert tree(blobs) == before


def test_work_dir_inside_output_is_refused(tiny, fake_hub, tmp_path):
    fake_hub.add_repo("org/tiny", tiny("llama"))
    with pytest.raises(ConvertError, match="holds the source folder"):
        convert("org/tiny", tmp_path / "out", endpoint=fake_hub.url, work_dir=tmp_path / "out" / "dl", progress=False)
    assert not (tmp_path / "out" / "config.json").exists() and not (tmp_path / "out" / STATE_DIR).exists()


def test_overwrite_keeps_files_no_conversion_wrote(src, tmp_path):
    out = tmp_path / "out"
    (out / ".git" / "objects").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / "notes.txt").write_text("mine")
    (out / "empty").mkdir()
    with pytest.raises(ConvertError, match=r"holds 3 entries \(.git/, empty/, notes.txt\) that no conversion wrote"):
        convert(str(src), out, progress=False)
    assert not (out / STATE_DIR).exists()  # a refused folder is left as it was
    lines = []
    convert(str(src), out, overwrite=True, progress=False, log=lines.append)
    assert any("keeping 3 entries" in line for line in lines)
    recompute_check(src, out)
    assert (out / "notes.txt").read_text() == "mine" and (out / ".git" / "HEAD").is_file() and (out / "empty").is_dir()
    # replacing that conversion with another still keeps them
    convert(str(src), out, weight_only=True, overwrite=True, progress=False)
    recompute_check(src, out, weight_only=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / ".git" / "HEAD").is_file()


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "model-00001-of-00009.safetensors",
                                  "pytorch_model.bin", "sub/model.safetensors.index.json"])
def test_overwrite_refuses_to_replace_or_mix_with_foreign_files(src, tmp_path, name):
    out = tmp_path / "out"
    (out / name).parent.mkdir(parents=True)
    (out / name).write_text("not from a conversion")
    with pytest.raises(ConvertError, match=f"would replace or mix with: {name}"):
        convert(str(src), out, overwrite=True, progress=False)
    assert (out / name).read_text() == "not from a conversion"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [name]


def test_previous_conversion_survives_a_failed_replacement(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(str(src), out, max_shard_size="30KB", progress=False)
    before = tree(out)
    from nvfp4_convert import pipeline

    original = pipeline._commit
    calls = []

    def fail_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise ConvertError("simulated failure")
        return original(*args)

    monkeypatch.setattr(pipeline, "_commit", fail_second)
    with pytest.raises(ConvertError, match="simulated failure"):
        convert(str(src), out, weight_only=True, max_shard_size="20KB", overwrite=True, progress=False)
    assert {k: v for k, v in tree(out).items() if not k.startswith(STATE_DIR)} == \
        {k: v for k, v in before.items() if not k.startswith(STATE_DIR)}
    assert read_conversion_info(out)["quant_algo"] == "NVFP4"
    recompute_check(src, out)
    monkeypatch.setattr(pipeline, "_commit", original)
    with pytest.raises(ConvertError, match="holds another conversion"):  # the same replacement needs --overwrite again
        convert(str(src), out, weight_only=True, max_shard_size="20KB", progress=False)
    report = convert(str(src), out, weight_only=True, max_shard_size="20KB", overwrite=True, progress=False)
    assert report.skipped_shards  # the staged shard finished before the failure is kept
    recompute_check(src, out, weight_only=True)  # no stale shard of the previous layout is left
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(set(index["weight_map"].values()))
    assert not (out / STATE_DIR / "next").exists()


def test_swap_cut_short_resumes_in_place(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(str(src), out, max_shard_size="30KB", progress=False)
    moved = []
    original = os.replace

    def stop_after_two(a, b):
        if "/next/" in str(a) and "/next/" not in str(b):  # moving a staged file into place
            if len(moved) == 2:
                raise KeyboardInterrupt
            moved.append(b)
        return original(a, b)

    monkeypatch.setattr(os, "replace", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        convert(str(src), out, weight_only=True, max_shard_size="20KB", overwrite=True, progress=False)
    monkeypatch.setattr(os, "replace", original)
    assert not (out / "config.json").exists()
    report = convert(str(src), out, weight_only=True, max_shard_size="20KB", progress=False)
    assert len(report.skipped_shards) == 2
    recompute_check(src, out, weight_only=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(set(index["weight_map"].values()))


def test_second_conversion_into_a_locked_folder_is_refused(src, tmp_path):
    out = tmp_path / "out"
    holder = OutputDir(out, fingerprint="other", files=[], sources={})
    try:
        with pytest.raises(ConvertError, match="another conversion is writing to this output folder"):
            convert(str(src), out, progress=False)
        with pytest.raises(ConvertError, match="another conversion is writing"):
            convert(str(src), out, overwrite=True, progress=False)
    finally:
        holder.close()
    convert(str(src), out, overwrite=True, progress=False)
    recompute_check(src, out)


def test_dangling_link_and_unwritable_parent(src, tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    with pytest.raises(ConvertError, match="link to something that does not exist"):
        convert(str(src), tmp_path / "dangling", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConvertError, match="the output path is a file"):
        convert(str(src), tmp_path / "file", progress=False)
    with pytest.raises(ConvertError, match="cannot create the output folder"):
        convert(str(src), tmp_path / "file" / "out", progress=False)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o555)
        with pytest.raises(ConvertError, match="cannot create the output folder"):
            convert(str(src), locked / "out", progress=False)
