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

    def watching_acquire(self, filename, **kwargs):
        path = original(self, filename, **kwargs)
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


def test_interrupt_during_a_stalled_download_ends_at_once_in_one_line(tiny, fake_hub, tmp_path):
    """Ctrl-C (twice, as impatient users do) while a shard download hangs: the run ends within seconds,
    with one line and no traceback, and the same command then resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from nvfp4_convert.sources import LocalSource

    src = tiny("llama")
    fake_hub.add_repo("org/tiny", src)
    shards = LocalSource(src).shards
    fake_hub.stall[shards[2]] = 1
    out = tmp_path / "out"
    args = ["org/tiny", str(out), "--endpoint", fake_hub.url, "--max-shard-size", "30KB", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), HF_HUB_DOWNLOAD_TIMEOUT="60")
    child = subprocess.Popen([sys.executable, "-c", "from nvfp4_convert.cli import main; main()", *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(r.path.endswith(shards[2]) and r.method == "GET" and not r.range for r in fake_hub.requests):
        assert time.monotonic() < deadline and child.poll() is None, child.stderr.read() if child.poll() else ""
        time.sleep(0.05)
    time.sleep(0.3)
    child.send_signal(signal.SIGINT)
    time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    start = time.monotonic()
    _, err = child.communicate(timeout=30)
    assert time.monotonic() - start < 6
    assert child.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted; run the same command again to resume"], err
    resumed = subprocess.run([sys.executable, "-c", "from nvfp4_convert.cli import main; main()", *args], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert snapshot(out) == snapshot(convert_locally(src, tmp_path / "local"))


def convert_locally(src: Path, out: Path) -> Path:
    convert(str(src), out, max_shard_size="30KB", progress=False)
    return out


def test_first_shard_downloads_while_the_backends_are_checked(tiny, fake_hub, tmp_path, monkeypatch):
    """The backend self-check takes seconds; a fresh Hub conversion spends them downloading, not waiting."""
    import time

    from nvfp4_convert import converter
    from nvfp4_convert.sources import LocalSource

    src = tiny("llama")
    fake_hub.add_repo("org/tiny", src)
    first = LocalSource(src).shards[0]
    original, seen = converter._choose_backend, []

    def slow_check(*args, **kwargs):
        deadline = time.monotonic() + 10
        while not _shard_gets(fake_hub, first) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(_shard_gets(fake_hub, first))
        return original(*args, **kwargs)

    monkeypatch.setattr(converter, "_choose_backend", slow_check)
    convert("org/tiny", tmp_path / "out", endpoint=fake_hub.url, max_shard_size="30KB", progress=False)
    assert seen == [1], "the first shard was not being downloaded during the backend check"
    assert len({r.path for r in fake_hub.requests if r.method == "GET" and r.path.endswith(".safetensors")
                and not r.range}) == len(LocalSource(src).shards)

    fake_hub.requests.clear()  # resuming: nothing is fetched before the output says what is still to do
    seen.clear()
    monkeypatch.setattr(converter, "_choose_backend", lambda *a, **k: (seen.append(_shard_gets(fake_hub, first)),
                                                                        original(*a, **k))[1])
    convert("org/tiny", tmp_path / "out", endpoint=fake_hub.url, max_shard_size="30KB", progress=False)
    assert seen == [0]


def _shard_gets(fake_hub, filename: str) -> int:
    return sum(r.method == "GET" and r.path.endswith("/" + filename) and not r.range for r in fake_hub.requests)


def test_sha256_checks_run_while_the_next_shard_downloads(tiny, fake_hub, tmp_path, monkeypatch):
    import time

    from nvfp4_convert.sources import LocalSource

    src = tiny("llama")
    fake_hub.add_repo("org/tiny", src)
    checks: dict[str, tuple[float, float]] = {}
    original = hub_module.HubSource._check_data

    def slow_check(self, filename, path):
        start = time.monotonic()
        time.sleep(0.3)  # a multi-GB shard's sha256
        original(self, filename, path)
        checks[filename] = (start, time.monotonic())

    monkeypatch.setattr(hub_module.HubSource, "_check_data", slow_check)
    convert("org/tiny", tmp_path / "hub", endpoint=fake_hub.url, max_shard_size="30KB", progress=False)
    shards = LocalSource(src).shards
    assert sorted(checks) == shards
    started = {r.path.rsplit("/", 1)[1]: r.time for r in fake_hub.requests
               if r.method == "GET" and r.path.endswith(".safetensors") and not r.range}
    overlapped = [a for a, b in zip(shards, shards[1:]) if started[b] < checks[a][1]]
    assert len(overlapped) >= len(shards) - 2, (overlapped, checks, started)
    convert(str(src), tmp_path / "local", max_shard_size="30KB", progress=False)
    assert snapshot(tmp_path / "hub") == snapshot(tmp_path / "local")


def test_corrupt_download_is_reported_as_such_and_nothing_made_from_it_is_kept(tiny, fake_hub, tmp_path):
    import pytest

    from nvfp4_convert.errors import ConvertError
    from nvfp4_convert.sources import LocalSource

    src = tiny("llama")
    fake_hub.add_repo("org/tiny", src)
    shard = LocalSource(src).shards[-1]
    good = (src / shard).read_bytes()
    (src / shard).write_bytes(good[:-2] + b"\xff\x7f")  # tensor bytes change (to a NaN): size, header stay
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match="sha256 mismatch") as info:
        convert("org/tiny", out, endpoint=fake_hub.url, max_shard_size="30KB", progress=False)
    assert shard in str(info.value)
    assert not (out / "config.json").exists()
    (src / shard).write_bytes(good)
    convert("org/tiny", out, endpoint=fake_hub.url, max_shard_size="30KB", progress=False)
    convert(str(src), tmp_path / "local", max_shard_size="30KB", progress=False)
    assert snapshot(out) == snapshot(tmp_path / "local")


def test_calibrated_hub_conversion_downloads_each_shard_once(tiny, fake_hub, tmp_path, monkeypatch):
    """--calibrate from a Hub repo: calibration and conversion share each downloaded shard (one GET per shard,
    a few shards on disk at a time), with the bytes of the same calibrated conversion from a folder; an
    interrupted run resumes to the same bytes."""
    import shutil

    import pytest

    from nvfp4_convert.calibration import collect, layers
    from tiny_models import add_byte_tokenizer

    pytest.importorskip("transformers")
    src = add_byte_tokenizer(shutil.copytree(tiny("llama"), tmp_path / "src"))
    (tmp_path / "calib.txt").write_text("Calibration text: ordinary prose, numbers like 1234 and 3.14159. " * 20)
    options = dict(calibrate=str(tmp_path / "calib.txt"), calib_samples=2, calib_seq_len=48, scales="mse-weighted",
                   max_shard_size="30KB", progress=False, log=lambda _: None)
    fake_hub.add_repo("org/tiny", src)
    convert(str(src), tmp_path / "local", **options)

    work = tmp_path / "work"
    on_disk = []
    original = hub_module.HubSource.acquire

    def watching_acquire(self, filename, **kwargs):
        path = original(self, filename, **kwargs)
        on_disk.append(len(list(work.glob("*.safetensors"))))
        return path

    monkeypatch.setattr(hub_module.HubSource, "acquire", watching_acquire)
    convert("org/tiny", tmp_path / "hub", endpoint=fake_hub.url, work_dir=work, **options)
    assert snapshot(tmp_path / "hub") == snapshot(tmp_path / "local")
    gets = [r.path for r in fake_hub.requests if r.method == "GET" and r.path.endswith(".safetensors") and not r.range]
    assert len(gets) == 7 and len(set(gets)) == 7, "a shard was downloaded twice"
    assert len(on_disk) == 7 and max(on_disk) <= 3 and not list(work.glob("*.safetensors"))

    monkeypatch.setattr(collect, "CHECKPOINT_SECONDS", 0.0)
    free, calls = layers.free, []

    def interrupt_in_layer_1(module):
        free(module)
        calls.append(module)
        if len(calls) == 3:  # the embedding, layer 0, then layer 1
            raise KeyboardInterrupt

    monkeypatch.setattr(layers, "free", interrupt_in_layer_1)
    with pytest.raises(KeyboardInterrupt):
        convert("org/tiny", tmp_path / "resumed", endpoint=fake_hub.url, work_dir=work, **options)
    monkeypatch.setattr(layers, "free", free)
    convert("org/tiny", tmp_path / "resumed", endpoint=fake_hub.url, work_dir=work, **options)
    assert snapshot(tmp_path / "resumed") == snapshot(tmp_path / "local")


def test_shared_shards_are_acquired_once_and_released_when_no_reader_claims_them():
    from nvfp4_convert.sources.shared import SharedShards

    class Counting:
        description = "counting"

        def __init__(self):
            self.calls = []

        def acquire(self, name, *, checked=True):
            self.calls.append(("acquire", name))
            return Path(name)

        def check(self, name):
            self.calls.append(("check", name))

        def release(self, name):
            self.calls.append(("release", name))

        def prefetch(self, name):
            self.calls.append(("prefetch", name))

    source = Counting()
    shared = SharedShards(source)
    later = {"b"}  # what the second reader still has to read, as it keeps it itself
    shared.claim("first", {"a", "b"})
    shared.claim("second", lambda s: s in later)
    first, second = shared.view("first"), shared.view("second")
    assert first.description == "counting"
    first.acquire("a"), first.acquire("b"), first.release("a")
    assert source.calls[-1] == ("release", "a")
    first.release("b")  # the second reader will read it: kept
    second.prefetch("b")
    assert second.acquire("b") == Path("b") and ("release", "b") not in source.calls
    later.clear()
    second.release("b")
    # the second reader's checked acquire of a held shard waits for its data check
    assert source.calls == [("acquire", "a"), ("acquire", "b"), ("release", "a"), ("check", "b"), ("release", "b")]
