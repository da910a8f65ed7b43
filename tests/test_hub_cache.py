"""A repo already in the Hugging Face cache converts from there: offline, or reading only what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import constants, hf_hub_download, snapshot_download

from checks import snapshot
from nvfp4_convert import ConvertError, convert

REPO = "org/tiny"


@pytest.fixture
def served(tiny, fake_hub, tmp_path):
    """The tiny llama served by the fake Hub, and its conversion from the local folder to compare with."""
    src = tiny("llama")
    sha = fake_hub.add_repo(REPO, src)
    convert(str(src), tmp_path / "local", backend="reference", progress=False)
    return src, sha


def _shards(src) -> list[str]:
    return sorted(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values())


def _shard_downloads(fake_hub) -> list[str]:
    return [r.path.rsplit("/", 1)[1] for r in fake_hub.requests
            if r.method == "GET" and r.path.endswith(".safetensors") and not r.range]


def test_offline_converts_a_cached_revision(served, fake_hub, tmp_path, monkeypatch):
    src, sha = served
    snapshot_download(REPO, endpoint=fake_hub.url)
    fake_hub.close()  # nothing answers: only the cache can serve
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    report = convert(REPO, tmp_path / "out", backend="reference", progress=False)
    assert report.source == f"{REPO}@{sha[:12]}"
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "local")


def test_unreachable_hub_falls_back_to_the_cache(served, fake_hub, tmp_path):
    snapshot_download(REPO, endpoint=fake_hub.url)
    url = fake_hub.url
    fake_hub.close()
    convert(REPO, tmp_path / "out", endpoint=url, backend="reference", progress=False)
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "local")


def test_partly_cached_downloads_only_what_is_missing(served, fake_hub, tmp_path):
    src, sha = served
    shards = _shards(src)
    cached = shards[::2]
    for name in ["config.json", "model.safetensors.index.json", *cached]:
        hf_hub_download(REPO, name, endpoint=fake_hub.url)
    fake_hub.requests.clear()
    convert(REPO, tmp_path / "out", endpoint=fake_hub.url, work_dir=tmp_path / "work", backend="reference",
            progress=False)
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "local")
    assert sorted(_shard_downloads(fake_hub)) == sorted(set(shards) - set(cached))
    for name in cached:  # the cache's copies are read in place and left alone
        assert hf_hub_download(REPO, name, revision=sha, endpoint=fake_hub.url, local_files_only=True)


def test_offline_without_the_cache_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConvertError, match=r"HF_HUB_OFFLINE is set, and org/tiny@main is not in the Hugging Face "
                                           r"cache.*unset HF_HUB_OFFLINE"):
        convert(REPO, tmp_path / "out", progress=False)


def test_offline_with_a_partial_cache_says_what_is_missing(served, fake_hub, tmp_path, monkeypatch):
    src, _ = served
    for name in ["config.json", "model.safetensors.index.json", _shards(src)[0]]:
        hf_hub_download(REPO, name, endpoint=fake_hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConvertError, match="cached org/tiny@main is incomplete.*missing"):
        convert(REPO, tmp_path / "out", progress=False)


def test_a_cache_repo_folder_gets_a_hint_to_its_snapshots(served, fake_hub, tmp_path):
    folder = Path(snapshot_download(REPO, endpoint=fake_hub.url))
    repo_folder = folder.parent.parent
    assert repo_folder.name == "models--org--tiny"
    with pytest.raises(ConvertError, match=rf"Hugging Face cache folder.*repo id {REPO}.*{folder.name}"):
        convert(str(repo_folder), tmp_path / "out", progress=False)
    convert(str(folder), tmp_path / "from-snapshot", backend="reference", progress=False)  # the hint works
