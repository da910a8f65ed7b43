"""A checkpoint in a Hugging Face Hub repo, streamed one shard at a time into a scratch folder."""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_url, try_to_load_from_cache
from huggingface_hub.utils import are_progress_bars_disabled, build_hf_headers, get_session, hf_raise_for_status
from huggingface_hub.utils.sha import sha_fileobj
from tqdm.auto import tqdm

from ..errors import ConvertError
from ..hub_errors import hub_errors
from ..safetensors_io import header_length, load_json, parse_header, read_header
from .base import ShardHeader, check_relative, structure_fingerprint, weight_shards

_API_TIMEOUT = 30.0  # seconds for an API call (repo info) to answer; downloads use HF_HUB_DOWNLOAD_TIMEOUT
_CLOSE_GRACE = 2.0  # seconds close() waits for an aborted download before leaving it to die with the process
_HEADER_PROBE = 100_000  # first ranged read; almost every safetensors header fits (as huggingface_hub assumes)
_METADATA_DIR = "metadata"  # subfolder of work_dir for small non-weight files


class _Stopped(Exception):
    """Raised inside a background download to abort it when the source is closed."""


class _Worker:
    """One daemon thread that runs jobs in order, returning futures.

    Unlike a ThreadPoolExecutor's worker it does not hold the process at exit, so an interrupt during a
    stalled download ends the run at once instead of after the library's timeouts and retries.
    """

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

    def shutdown(self, *, grace: float) -> None:
        self._jobs.put(None)
        self._thread.join(grace)


class _HubWarnings(logging.Filter):
    """Keeps huggingface_hub's own warnings (retries, resumed downloads) about our calls off the terminal:
    each fault ends in the converter's one line instead. Other uses of huggingface_hub are untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = getattr(_CALLING, "active", False) or record.threadName.startswith(_THREAD_PREFIX)
        return not (ours and record.name.startswith("huggingface_hub") and record.levelno < logging.ERROR)


_THREAD_PREFIX = "nvfp4-"
_CALLING = threading.local()  # .active while this thread is inside HubSource._hub_errors
_FILTER = _HubWarnings()


def _quiet_hub_warnings() -> None:
    """Install :class:`_HubWarnings` on huggingface_hub's handlers (once)."""
    for handler in logging.getLogger("huggingface_hub").handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


class _QuietBar:
    """A stand-in for huggingface_hub's per-file progress bars that shows nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def update_transfer(self, n=1):  # xet also reports wire bytes; only file bytes are counted
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    set_transfer_postfix_str = set_postfix_str

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def cached_file(repo_id: str, filename: str, *, revision: str) -> Path | None:
    """``filename`` of ``repo_id`` at commit ``revision`` in the Hugging Face cache, if it is there."""
    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return Path(found) if isinstance(found, str) else None


class HubSource:
    """A Hub repo pinned to one commit; shards are downloaded into ``work_dir`` on demand and deleted on release.

    Files of that commit already in the Hugging Face cache (``HF_HUB_CACHE``) are read there, in place,
    and never deleted: only what is missing is downloaded. At most one download runs at a time: the shard
    being acquired or the one prefetched ahead, so ``work_dir`` holds the shards currently acquired plus
    at most one more.
    """

    def __init__(self, repo_id: str, *, revision: str | None = None, token: str | None = None,
                 endpoint: str | None = None, work_dir: Path | None = None, keep_source: bool = False):
        self.repo_id = repo_id
        self.keep_source = keep_source
        self._api = HfApi(endpoint=endpoint, token=token)
        self._requested_revision = revision
        self.description = repo_id
        _quiet_hub_warnings()
        with self._hub_errors():
            info = self._api.model_info(repo_id, revision=revision, files_metadata=True, timeout=_API_TIMEOUT)
        self.revision: str = info.sha
        self.description = f"{repo_id}@{self.revision[:12]}"
        self._siblings = {s.rfilename: s for s in info.siblings or []}
        self._files = sorted(self._siblings)

        self._temp = work_dir is None
        self.work_dir = Path(tempfile.mkdtemp(prefix="nvfp4-hub-") if work_dir is None else work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._pool = _Worker(_THREAD_PREFIX + "download")
        self._checker = _Worker(_THREAD_PREFIX + "check")  # sha256 of finished downloads, off the link's path
        self._checks: dict[str, Future[None]] = {}  # downloaded shard -> its data check
        self._pending: dict[str, Future[Path]] = {}  # submitted, not acquired yet
        self._held: dict[str, Path] = {}  # acquired, not released yet
        self._cached: set[str] = set()  # read from the Hugging Face cache, never deleted
        self._stop = threading.Event()
        self._bar: tqdm | None = None
        self._headers: dict[str, ShardHeader] | None = None
        try:
            self.shards, self.weight_map = weight_shards(self._files, self.read_json, where=self.description)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"HubSource({self.description!r})"

    @property
    def files(self) -> list[str]:
        return list(self._files)

    # -- small files and headers ---------------------------------------------------------------

    def fetch_file(self, filename: str) -> Path:
        """Download a small file into the metadata subfolder of ``work_dir`` and return its path."""
        check_relative(filename, where=self.description)
        if filename not in self._siblings:
            raise ConvertError(f"{filename} is missing", where=self.description,
                               fix="A Hugging Face checkpoint repo needs config.json" if filename == "config.json"
                               else "The file is not in this revision of the repo")
        if (cached := cached_file(self.repo_id, filename, revision=self.revision)) is not None:
            return cached
        with self._hub_errors(filename):
            return Path(self._api.hf_hub_download(self.repo_id, filename, revision=self.revision,
                                                  local_dir=self.work_dir / _METADATA_DIR, tqdm_class=_QuietBar))

    def read_json(self, filename: str) -> dict:
        path = self.fetch_file(filename)
        return load_json(path, filename=filename, where=self.description,
                         fix="Fix the file in the repo or pick another revision")

    def headers(self) -> dict[str, ShardHeader]:
        """Every shard's header, read with HTTP range requests (no tensor data is downloaded)."""
        if self._headers is None:
            with ThreadPoolExecutor(max_workers=8, thread_name_prefix=_THREAD_PREFIX + "header") as pool:
                self._headers = dict(zip(self.shards, pool.map(self._remote_header, self.shards)))
        return self._headers

    def _remote_header(self, filename: str) -> ShardHeader:
        if (cached := cached_file(self.repo_id, filename, revision=self.revision)) is not None:
            return read_header(cached, filename=filename)
        size = self._siblings[filename].size or 0
        url = hf_hub_url(self.repo_id, filename, revision=self.revision, endpoint=self._api.endpoint)
        with self._hub_errors(filename):
            head = self._read_range(url, 0, min(size, _HEADER_PROBE)) if size >= 8 else b""
            length = header_length(head, file_size=size, filename=filename)
            if 8 + length > len(head):
                head += self._read_range(url, len(head), 8 + length - len(head))
        return parse_header(head[8:8 + length], filename=filename, file_size=size)

    def _read_range(self, url: str, start: int, length: int) -> bytes:
        """``length`` bytes of ``url`` from ``start``; streams, so a server ignoring ``Range`` costs no more."""
        headers = {**build_hf_headers(token=self._api.token), "Range": f"bytes={start}-{start + length - 1}"}
        buf = bytearray()
        with get_session().stream("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
            if r.status_code >= 400:
                r.read()
            hf_raise_for_status(r)
            skip = start if r.status_code == 200 else 0
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) >= skip + length:
                    break
        return bytes(buf[skip:skip + length])

    # -- shards ----------------------------------------------------------------------------------

    def prefetch(self, filename: str) -> None:
        """Start downloading ``filename`` in the background; ignored while another prefetch is pending."""
        self._check_shard(filename)
        if filename in self._held or filename in self._pending or self._pending:
            return
        self.headers()  # plan first, on this thread, so the worker only compares
        self._pending[filename] = self._pool.submit(self._download, filename)

    def acquire(self, filename: str, *, checked: bool = True) -> Path:
        """Download (or wait for the prefetch of) ``filename``, check its header, return its path.

        Its sha256 is computed on a thread of its own, so the next download can start meanwhile; with
        ``checked`` this waits for it too, else :meth:`check` does.
        """
        self._check_shard(filename)
        if filename not in self._held:
            self.headers()
            future = self._pending.pop(filename, None) or self._pool.submit(self._download, filename)
            self._held[filename] = future.result()
        if checked:
            self.check(filename)
        return self._held[filename]

    def check(self, filename: str) -> None:
        if (future := self._checks.get(filename)) is not None:
            try:
                future.result()
            except ConvertError:
                self._delete(filename)  # a re-run downloads it again
                raise

    def release(self, filename: str) -> None:
        """Done with ``filename``: delete the downloaded copy unless ``keep_source``.

        A data check still running is waited for (its verdict stays for :meth:`check`)."""
        self._held.pop(filename, None)
        pending = self._pending.pop(filename, None)
        if pending is not None and pending.cancel():
            pending = None  # never started: nothing to wait for
        for future in (pending, self._checks.get(filename)):
            if future is not None:
                try:
                    future.result()
                except (ConvertError, _Stopped):
                    pass
        if not self.keep_source:
            self._delete(filename)

    def _check_shard(self, filename: str) -> None:
        if filename not in self.shards:
            raise ValueError(f"{filename!r} is not a weight shard of {self.description}")

    def _download(self, filename: str) -> Path:
        """Runs on the download thread: fetch ``filename`` into work_dir (unless cached), check its header and
        queue its sha256 check."""
        if (cached := cached_file(self.repo_id, filename, revision=self.revision)) is not None:
            self._cached.add(filename)
            path = cached
        else:
            with self._hub_errors(filename):
                path = Path(self._api.hf_hub_download(self.repo_id, filename, revision=self.revision,
                                                      local_dir=self.work_dir, tqdm_class=self._bar_class()))
        try:
            if read_header(path, filename=filename) != self.headers()[filename]:
                raise ConvertError("downloaded shard's header differs from the one read before the download",
                                   where=f"{self.description}/{filename}", fix="Re-run the conversion")
        except ConvertError:
            self._delete(filename)
            raise
        self._checks[filename] = self._checker.submit(self._check_data, filename, path)
        return path

    def _check_data(self, filename: str, path: Path) -> None:
        """Runs on the check thread: the file's sha256 against the one the Hub lists."""
        lfs = self._siblings[filename].lfs
        if lfs is None or path.resolve().name == lfs.sha256:
            return  # a plain git file has only a sha1 we skip; a cache blob is named by its checked sha256
        with open(path, "rb") as f:
            actual = sha_fileobj(f).hex()
        if actual != lfs.sha256:
            raise ConvertError(f"sha256 mismatch: downloaded {actual[:16]}…, the Hub lists {lfs.sha256[:16]}…",
                               where=f"{self.description}/{filename}",
                               fix="Re-run to download it again; if it persists the repo's file is corrupt")

    def _delete(self, filename: str) -> None:
        if filename in self._cached:
            return  # the Hugging Face cache's own copy
        (self.work_dir / filename).unlink(missing_ok=True)
        meta = self.work_dir / ".cache" / "huggingface" / "download" / f"{filename}.metadata"
        meta.unlink(missing_ok=True)
        meta.with_suffix(".lock").unlink(missing_ok=True)

    def _bar_class(self) -> type:
        """A ``tqdm_class`` for huggingface_hub that feeds one aggregate bar instead of a bar per file."""
        if self._bar is None:
            total = sum(self._siblings[s].size or 0 for s in self.shards)
            self._bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"download {self.repo_id}",
                             disable=True if are_progress_bars_disabled() else None)
        bar, stop = self._bar, self._stop

        class Forward(_QuietBar):
            def __init__(self, *args, initial=0, **kwargs):
                if initial:  # bytes resumed from an earlier partial download
                    bar.update(initial)

            def update(self, n=1):
                if stop.is_set():
                    raise _Stopped
                bar.update(n)

        return Forward

    def fingerprint(self) -> str:
        return structure_fingerprint(f"hub:{self.repo_id}", self.fetch_file("config.json").read_bytes()
                                     if "config.json" in self._siblings else b"", self.headers())

    def shard_fingerprints(self) -> dict[str, str]:
        """The Hub's sha256 of each shard (its git blob id for a file not in LFS): exact and free."""
        prints = {}
        for name in self.shards:
            sibling = self._siblings[name]
            prints[name] = f"sha256:{sibling.lfs.sha256}" if sibling.lfs is not None else f"git:{sibling.blob_id}"
        return prints

    def local_roots(self) -> list[Path]:
        return [self.work_dir]

    def local_files(self) -> list[Path]:
        return []

    def close(self) -> None:
        """Abort background downloads, delete shards not kept, and the scratch folder if it was a temp one."""
        self._stop.set()
        for future in self._pending.values():
            future.cancel()
        for filename, future in self._checks.items():
            if not future.cancel() and future.done() and isinstance(future.exception(), ConvertError):
                self._delete(filename)
        self._pool.shutdown(grace=_CLOSE_GRACE)
        self._checker.shutdown(grace=_CLOSE_GRACE)
        if not self.keep_source:
            for filename in [*self._pending, *self._held]:
                self._delete(filename)
        self._pending.clear()
        self._held.clear()
        if self._bar is not None:
            self._bar.close()
        if self._temp:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- errors ----------------------------------------------------------------------------------

    @contextmanager
    def _hub_errors(self, filename: str | None = None) -> Iterator[None]:
        """Hub, network and disk errors inside the block as one-line ConvertErrors (never echoing the token)."""
        outer, _CALLING.active = getattr(_CALLING, "active", False), True
        try:
            with hub_errors(self.repo_id, where=f"{self.description}/{filename}" if filename else self.description,
                            endpoint=self._api.endpoint, revision=self._requested_revision,
                            work_dir=getattr(self, "work_dir", None)):
                yield
        finally:
            _CALLING.active = outer
