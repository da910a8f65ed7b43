"""Hub streaming: does converting from the Hub take no longer than downloading the same bytes?

    python benchmarks/hub_stream.py --dir /tmp/hubstream                       # ~1 GB at 100 MB/s
    python benchmarks/hub_stream.py --dir /tmp/hubstream --size 4GB --shard-size 500MB --mbps 250

Writes a random BF16 Llama-shaped checkpoint (as ``end_to_end.py`` does), serves it from the loopback fake
Hub of the tests throttled to ``--mbps`` megabytes per second (one shared link), and in one run measures

  1. download only: every weight shard fetched once with ``hf_hub_download`` into a scratch folder (and
     deleted), one after the other, as a plain download of the same bytes would;
  2. ``convert()`` from the repo id (shards streamed through the work dir while converting), sampling the
     disk used under the work dir every 20 ms;
  3. download only again (both download times are shown; the ratio uses their mean).

It prints the conversion time against the download time (goal: at most 1.1x) and the work dir's peak
against two source shards (goal: at most that; the output folder is reported separately).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]
os.environ.update(HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hubstream-hf-"))  # an empty cache: nothing is reused

REPO = "bench/stream"


def _disk_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class _DiskWatch(threading.Thread):
    """Samples the disk used under a folder until stopped; ``peak`` is the largest sample."""

    def __init__(self, folder: Path, interval: float = 0.02):
        super().__init__(daemon=True)
        self.folder, self.interval, self.peak = folder, interval, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _disk_bytes(self.folder))
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def _download_all(endpoint: str, shards: list[str], scratch: Path) -> float:
    from huggingface_hub import hf_hub_download

    started = time.perf_counter()
    for name in shards:
        path = Path(hf_hub_download(REPO, name, endpoint=endpoint, local_dir=scratch))
        path.unlink()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="scratch folder (source, work dir, output)")
    parser.add_argument("--size", default="1GB", help="checkpoint size (default 1GB)")
    parser.add_argument("--shard-size", default="250MB", help="source shard size (default 250MB)")
    parser.add_argument("--mbps", type=float, default=100.0, help="link speed in MB/s (default 100)")
    parser.add_argument("--backend", default=None, help="quantize backend (default: automatic)")
    args = parser.parse_args()

    from end_to_end import make_checkpoint

    from fakehub import FakeHub
    from nvfp4_convert import convert
    from nvfp4_convert.converter import parse_size
    from nvfp4_convert.report import human_bytes

    src, work, out, scratch = (args.dir / n for n in ("src", "work", "out", "download"))
    shutil.rmtree(args.dir, ignore_errors=True)
    total = make_checkpoint(src, parse_size(args.size), shard_size=parse_size(args.shard_size), vocab=1024)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    largest = max((src / s).stat().st_size for s in shards)

    hub = FakeHub()
    try:
        hub.add_repo(REPO, src)
        hub.bandwidth = args.mbps * 1e6
        print(f"checkpoint: {human_bytes(total)} in {len(shards)} shards (largest {human_bytes(largest)}); "
              f"link {args.mbps:g} MB/s; {os.cpu_count()} CPUs")
        first = _download_all(hub.url, shards, scratch)
        print(f"download only:     {first:.2f} s")
        watch = _DiskWatch(work)
        work.mkdir(parents=True)
        watch.start()
        started = time.perf_counter()
        report = convert(REPO, out, endpoint=hub.url, work_dir=work, backend=args.backend, progress=False)
        converting = time.perf_counter() - started
        peak = watch.stop()
        print(f"convert:           {converting:.2f} s (backend {report.backend}, of which "
              f"{report.check_seconds:.2f} s backend self-check)")
        second = _download_all(hub.url, shards, scratch)
        print(f"download only:     {second:.2f} s")
    finally:
        hub.close()
    download = (first + second) / 2
    print(f"convert / download: {converting / download:.3f}x (goal <= 1.1x)")
    print(f"work dir peak:      {human_bytes(peak)} = {peak / largest:.2f} source shards (goal <= 2); "
          f"output {human_bytes(_disk_bytes(out))}")


if __name__ == "__main__":
    main()
