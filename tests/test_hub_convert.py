"""Converting straight from a (loopback) Hub repo: same bytes as from a folder, bounded disk."""

from __future__ import annotations

from pathlib import Path

from checks import snapshot
from nvfp4_convert import convert
from nvfp4_convert.sources import hub as hub_module


def test_hub_conversion_equals_local_and_deletes_shards(tiny, fake_hub, tmp_path, monkeypatch):
    src = tiny("mixtral")
    fake_hub.add_repo("org/tiny-mixtral", src)
    convert(str(src), tmp_path / "local", max_shard_size="40KB", progress=False)

    work = tmp_path / "work"
    seen = []
    original = hub_module.HubSource.acquire

    def watching_acquire(self, filename):
        path = original(self, filename)
        seen.append(sorted(p.name for p in work.glob("*.safetensors")))
        return path

    monkeypatch.setattr(hub_module.HubSource, "acquire", watching_acquire)
    report = convert("org/tiny-mixtral", tmp_path / "hub", endpoint=fake_hub.url, work_dir=work,
                     max_shard_size="40KB", progress=False)
    assert report.source.startswith("org/tiny-mixtral@")
    assert snapshot(tmp_path / "hub") == snapshot(tmp_path / "local")
    assert max(len(s) for s in seen) <= 3  # the shards in use plus one prefetched, never the whole model
    assert not list(work.glob("*.safetensors"))
    gets = [r.path for r in fake_hub.requests if r.method == "GET" and r.path.endswith(".safetensors") and not r.range]
    assert len(gets) == len(set(gets)), "a shard was downloaded twice"


def test_keep_source(tiny, fake_hub, tmp_path):
    fake_hub.add_repo("org/tiny", tiny("llama"))
    convert("org/tiny", tmp_path / "out", endpoint=fake_hub.url, work_dir=tmp_path / "work", keep_source=True,
            progress=False)
    assert len(list(Path(tmp_path / "work").glob("*.safetensors"))) == 7
