"""HubSource against the loopback fake Hub: the real huggingface_hub HTTP path, no network."""

from __future__ import annotations

import errno
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from nvfp4_convert.errors import ConvertError
from nvfp4_convert.sources import LocalSource
from nvfp4_convert.sources import hub as hub_module
from nvfp4_convert.sources.hub import HubSource

TOKEN = "hf_fakeSecretToken1234567890"
REPO = "org/tiny-llama"


@pytest.fixture(scope="module")
def tiny_model(tiny) -> Path:
    path = tiny("llama")
    assert len(LocalSource(path).shards) >= 5
    return path


@pytest.fixture
def model(tiny_model, tmp_path) -> Path:
    """A private copy of the tiny model, so a test may corrupt or change it."""
    return Path(shutil.copytree(tiny_model, tmp_path / "served"))


@pytest.fixture
def served(fake_hub, model) -> str:
    return fake_hub.add_repo(REPO, model)


def open_hub(fake_hub, tmp_path, **kwargs) -> HubSource:
    kwargs.setdefault("work_dir", tmp_path / "work")
    return HubSource(kwargs.pop("repo_id", REPO), endpoint=fake_hub.url, **kwargs)


def shard_files(folder: Path) -> list[Path]:
    """Shards on disk, whole or partial (huggingface_hub's ``.incomplete`` files)."""
    return [p for p in folder.rglob("*") if p.name.endswith((".safetensors", ".incomplete"))]


def test_headers_read_by_range_without_download(fake_hub, served, model, tmp_path, monkeypatch):
    monkeypatch.setattr(hub_module, "_HEADER_PROBE", 16)  # force the second ranged read of each header
    src = open_hub(fake_hub, tmp_path)
    try:
        assert src.revision == served and src.description == f"{REPO}@{served[:12]}"
        assert src.fingerprint() == LocalSource(model).fingerprint().replace("local:", f"hub:{REPO}:")
        assert all(v.startswith("sha256:") for v in src.shard_fingerprints().values())
        assert src.shards == LocalSource(model).shards and src.weight_map == LocalSource(model).weight_map
        assert src.headers() == LocalSource(model).headers()
        shard_gets = [r for r in fake_hub.requests if r.method == "GET" and r.path.endswith(".safetensors")]
        assert shard_gets and all(r.range for r in shard_gets)
        fetched = sum(int(b) - int(a) + 1 for a, b in (r.range[len("bytes="):].split("-") for r in shard_gets))
        assert fetched < sum((model / s).stat().st_size for s in src.shards) / 4
        assert not shard_files(src.work_dir)
    finally:
        src.close()


def test_revision_is_resolved_once(fake_hub, served, model, tmp_path):
    src = open_hub(fake_hub, tmp_path, revision="main")
    try:
        newer = Path(shutil.copytree(model, tmp_path / "newer"))
        (newer / "config.json").write_text('{"changed": true}')
        assert fake_hub.add_repo(REPO, newer) != served  # main moves on after the source was opened
        assert "changed" not in src.read_json("config.json")
        src.headers()
        src.acquire(src.shards[0])
        mentions_main = [r for r in fake_hub.requests if "/main" in r.path]
        assert [r.path for r in mentions_main] == [f"/api/models/{REPO}/revision/main"]
        resolves = [r for r in fake_hub.requests if "/resolve/" in r.path]
        assert resolves and all(f"/resolve/{served}/" in r.path for r in resolves)
    finally:
        src.close()


def test_full_pass_keeps_two_shards_on_disk_and_prefetch_overlaps(fake_hub, served, model, tmp_path):
    src = open_hub(fake_hub, tmp_path)
    most, done = 0, threading.Event()

    def watch():
        nonlocal most
        while not done.is_set():
            most = max(most, len(shard_files(src.work_dir)))
            time.sleep(0.0005)

    def get_started(shard: str) -> float | None:
        starts = [r.time for r in fake_hub.requests if r.method == "GET" and r.range is None and r.path.endswith(shard)]
        return starts[0] if starts else None

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        shards = src.shards
        for i, shard in enumerate(shards):
            path = src.acquire(shard)
            assert path.read_bytes() == (model / shard).read_bytes()
            if i + 1 < len(shards):
                src.prefetch(shards[i + 1])
                deadline = time.monotonic() + 10  # "convert" until the next download has begun
                while get_started(shards[i + 1]) is None and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert get_started(shards[i + 1]) is not None, "prefetch did not start a download"
            released_at = time.monotonic()
            most = max(most, len(shard_files(src.work_dir)))
            src.release(shard)
            assert not (src.work_dir / shard).exists()
            if i + 1 < len(shards):
                assert get_started(shards[i + 1]) < released_at
    finally:
        done.set()
        watcher.join()
        src.close()
    assert most == 2
    assert not shard_files(src.work_dir)
    assert not list((src.work_dir / ".cache").rglob("*.metadata"))


def test_cut_download_is_resumed_and_verified(fake_hub, served, model, tmp_path, capfd):
    src = open_hub(fake_hub, tmp_path)
    shard = src.shards[1]
    fake_hub.truncate_once.add(shard)
    try:
        assert src.acquire(shard).read_bytes() == (model / shard).read_bytes()
    finally:
        src.close()
    assert not fake_hub.truncate_once
    gets = [r for r in fake_hub.requests if r.method == "GET" and r.path.endswith(shard) and r.range is None]
    assert len(gets) == 2  # the cut one, then the retry
    err = capfd.readouterr().err  # the library's "Error while downloading ... Trying to resume" stays quiet
    assert "error" not in err.lower() and "resume" not in err.lower(), err


def test_corrupted_shard_on_server_is_refused(fake_hub, served, model, tmp_path):
    src = open_hub(fake_hub, tmp_path)
    shard = src.shards[0]
    try:
        src.headers()
        data = bytearray((model / shard).read_bytes())
        data[-1] ^= 0xFF  # tensor bytes change; size and header stay as advertised
        (model / shard).write_bytes(bytes(data))
        with pytest.raises(ConvertError, match="sha256") as info:
            src.acquire(shard)
        assert shard in str(info.value)
        assert not (src.work_dir / shard).exists()
    finally:
        src.close()


def test_unknown_repo(fake_hub, tmp_path):
    with pytest.raises(ConvertError, match="repo not found") as info:
        open_hub(fake_hub, tmp_path, repo_id="org/missing", token=TOKEN)
    assert "org/missing" in str(info.value) and TOKEN not in str(info.value)


def test_unknown_revision(fake_hub, served, tmp_path):
    with pytest.raises(ConvertError, match="revision 'v9' not found"):
        open_hub(fake_hub, tmp_path, revision="v9")


def test_gated_repo_needs_a_token(fake_hub, model, tmp_path):
    fake_hub.add_repo(REPO, model, gated=True)
    with pytest.raises(ConvertError, match="gated") as info:
        open_hub(fake_hub, tmp_path)
    assert "HF_TOKEN" in str(info.value)


def test_gated_repo_with_token(fake_hub, model, tmp_path, caplog):
    fake_hub.add_repo(REPO, model, gated=True)
    caplog.set_level("DEBUG")
    src = open_hub(fake_hub, tmp_path, token=TOKEN, keep_source=True)
    try:
        src.headers()
        src.acquire(src.shards[0])
        src.fetch_file("tokenizer_config.json")
        data = bytearray((model / src.shards[1]).read_bytes())
        data[-1] ^= 0xFF
        (model / src.shards[1]).write_bytes(bytes(data))
        with pytest.raises(ConvertError) as info:
            src.acquire(src.shards[1])
        texts = [str(info.value), repr(src), caplog.text]
    finally:
        src.close()
    assert all(r.authorized for r in fake_hub.requests)
    assert not any(TOKEN in text for text in texts)
    for path in src.work_dir.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


def test_token_from_environment(fake_hub, model, tmp_path, monkeypatch):
    fake_hub.add_repo(REPO, model, gated=True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    src = open_hub(fake_hub, tmp_path)
    src.close()
    assert all(r.authorized for r in fake_hub.requests)


def test_keep_source_keeps_shards(fake_hub, served, model, tmp_path):
    src = open_hub(fake_hub, tmp_path, keep_source=True)
    for shard in src.shards[:2]:
        src.acquire(shard)
        src.release(shard)
    src.close()
    for shard in src.shards[:2]:
        assert (src.work_dir / shard).read_bytes() == (model / shard).read_bytes()


def test_temp_work_dir_is_removed_on_close(fake_hub, served, tmp_path):
    src = HubSource(REPO, endpoint=fake_hub.url)
    path = src.acquire(src.shards[0])
    src.prefetch(src.shards[1])
    assert path.is_file()
    src.close()
    assert not src.work_dir.exists()


def test_unreachable_hub(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConvertError, match="cannot reach the Hub"):
        HubSource(REPO, endpoint=f"http://127.0.0.1:{port}", work_dir=tmp_path)


def test_hub_that_never_answers_times_out(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_module, "_API_TIMEOUT", 0.5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()  # connections are queued, never answered
        start = time.monotonic()
        with pytest.raises(ConvertError, match="cannot reach the Hub"):
            HubSource(REPO, endpoint=f"http://127.0.0.1:{s.getsockname()[1]}", work_dir=tmp_path)
        assert time.monotonic() - start < 10


def test_stalled_download_ends_in_our_line_only(fake_hub, served, model, tmp_path, monkeypatch, capfd):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    src = open_hub(fake_hub, tmp_path)
    start = time.monotonic()
    try:
        shard = src.shards[0]
        src.headers()
        fake_hub.stall[shard] = 10**6
        with pytest.raises(ConvertError, match="cannot reach the Hub"):
            src.acquire(shard)
    finally:
        src.close()
    assert time.monotonic() - start < 30
    err = capfd.readouterr().err
    assert "warning" not in err.lower() and "retry" not in err.lower() and "error" not in err.lower(), err


def test_close_during_a_stalled_download_is_prompt(fake_hub, served, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 30)
    src = open_hub(fake_hub, tmp_path)
    shard = src.shards[0]
    src.headers()
    fake_hub.stall[shard] = 10**6
    src.prefetch(shard)
    while not any(r.path.endswith(shard) and r.method == "GET" and r.range is None for r in fake_hub.requests):
        time.sleep(0.05)
    start = time.monotonic()
    src.close()  # what an interrupt does; it must not wait for the stalled read's timeouts and retries
    assert time.monotonic() - start < hub_module._CLOSE_GRACE + 1
    assert not list(src.work_dir.rglob("*.safetensors"))  # at most huggingface_hub's resumable .incomplete


def test_disk_full(fake_hub, served, tmp_path, monkeypatch):
    src = open_hub(fake_hub, tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(HfApi, "hf_hub_download", full)
    try:
        with pytest.raises(ConvertError, match="disk full"):
            src.acquire(src.shards[0])
    finally:
        src.close()


def test_pickle_only_repo_is_refused(fake_hub, tmp_path):
    folder = tmp_path / "pickle"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    fake_hub.add_repo("org/pickle", folder)
    with pytest.raises(ConvertError, match="pickle"):
        open_hub(fake_hub, tmp_path, repo_id="org/pickle")


def test_fake_hub_upload_round_trip(fake_hub, tmp_path):
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    (folder / "README.md").write_text("---\nbase_model_relation: quantized\n---\n# card\n")
    (folder / "sub" / "model.safetensors").write_bytes(b"\x01" * 64)
    api = HfApi(endpoint=fake_hub.url, token=TOKEN)
    api.create_repo("me/out", exist_ok=True)
    api.create_repo("me/out", exist_ok=True)
    api.upload_folder(repo_id="me/out", folder_path=folder, commit_message="upload")
    assert fake_hub.uploaded("me/out") == {"README.md": (folder / "README.md").read_bytes(),
                                           "sub/model.safetensors": b"\x01" * 64}
    got = api.hf_hub_download("me/out", "sub/model.safetensors", local_dir=tmp_path / "dl")
    assert Path(got).read_bytes() == b"\x01" * 64



def test_download_that_times_out_is_retried_in_process(fake_hub, served, model, tmp_path, monkeypatch, capfd):
    """A read time-out mid-download (a stalled connection) is tried again within the run, quietly, instead of
    failing it; only a link that stays down ends it (see the stalled-download test)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    src = open_hub(fake_hub, tmp_path)
    shard = src.shards[1]
    try:
        src.headers()
        fake_hub.stall[shard] = 1  # the first attempt stalls half-way
        assert src.acquire(shard).read_bytes() == (model / shard).read_bytes()
    finally:
        src.close()
    assert fake_hub.stall[shard] == 0
    downloads = [r for r in fake_hub.requests if r.method == "GET" and r.path.endswith(shard) and r.range is None]
    assert len(downloads) == 2  # the stalled one, then the retry
    err = capfd.readouterr().err
    assert "warning" not in err.lower() and "retry" not in err.lower() and "error" not in err.lower(), err
