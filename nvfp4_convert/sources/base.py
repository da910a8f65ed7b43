"""What the converter needs from a checkpoint source, local folder or Hub repo alike."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..safetensors_io import ShardHeader, TensorInfo  # noqa: F401  (re-exported)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SHARD = "model.safetensors"


class Source(Protocol):
    """A checkpoint to convert. Implementations: :class:`LocalSource`, :class:`HubSource`.

    Lifecycle: the converter reads ``config``, ``files`` and ``headers()`` to plan (no tensor data),
    then for each shard it needs calls ``prefetch`` (optional, may start a background download),
    ``acquire`` (blocks until a verified local file is there) and ``release`` (done with it: a
    downloaded copy may be deleted).
    """

    description: str  # e.g. "meta-llama/Llama-3.1-8B @ 0123abcd" or "/path/to/folder"
    revision: str | None  # resolved commit sha for Hub sources, None for local folders

    @property
    def files(self) -> list[str]:
        """Every file of the checkpoint, as relative POSIX paths."""

    def read_json(self, filename: str) -> dict:
        """Load a small JSON file (``config.json``, the safetensors index)."""

    def fetch_file(self, filename: str) -> Path:
        """A local path for a small non-weight file (tokenizer, card, ...), downloading if needed."""

    def headers(self) -> dict[str, ShardHeader]:
        """Header of every weight shard, keyed by shard filename, read without tensor data."""

    def prefetch(self, filename: str) -> None:
        """Start getting ``filename`` in the background (no-op where not applicable)."""

    def acquire(self, filename: str, *, checked: bool = True) -> Path:
        """A local path for the shard ``filename``; blocks until it is there.

        With ``checked`` (the default) its data is verified too. Without, its header is, and the data check
        (a download's sha256) may still be running: call :meth:`check` before trusting what was made from it.
        """

    def check(self, filename: str) -> None:
        """Wait for the data check of an acquired shard; raise its one-line error if it failed."""

    def release(self, filename: str) -> None:
        """The converter no longer needs ``filename``; a downloaded copy may be deleted."""

    def fingerprint(self) -> str:
        """The source's structure (config and shard headers), used to decide whether a resume is the same job."""

    def shard_fingerprints(self) -> dict[str, str]:
        """For each weight shard, a fingerprint of its data: a finished output shard is kept on resume only
        while the source shards it was made from still have the fingerprints it was made with."""

    def local_roots(self) -> list[Path]:
        """Local folders the source reads or writes (the output must not overlap them)."""

    def local_files(self) -> list[Path]:
        """Local paths of the source's files, links not yet followed (empty for a remote source)."""

    def close(self) -> None:
        """Stop background work and clean up scratch files."""


def structure_fingerprint(kind: str, config: bytes, headers: dict[str, ShardHeader]) -> str:
    """``kind:`` and a sha256 over ``config.json``'s bytes and every shard's header (names, dtypes, shapes, offsets)."""
    import hashlib

    digest = hashlib.sha256(config)
    for name, header in sorted(headers.items()):
        digest.update(f"{name}:{header.file_size}:{header.data_start}".encode())
        for t in sorted(header.tensors.values(), key=lambda t: t.name):
            digest.update(f"{t.name}|{t.dtype}|{t.shape}|{t.data_offsets}".encode())
    return f"{kind}:{digest.hexdigest()}"


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_relative(filename: str, *, where: str) -> str:
    """Refuse a file name that could point outside the checkpoint folder."""
    from ..errors import ConvertError

    parts = filename.replace("\\", "/").split("/")
    if not filename or filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise ConvertError(f"file name {filename!r} points outside the checkpoint", where=where,
                           fix="Fix the index; shard names must be plain relative paths")
    return filename


def weight_shards(files: list[str], read_json, *, where: str) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors shards of a checkpoint, and the index's tensor -> shard map if there is one."""
    from ..errors import ConvertError

    present = set(files)
    if SAFETENSORS_INDEX in present:
        index = read_json(SAFETENSORS_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError("the safetensors index has no weight_map", where=f"{where}/{SAFETENSORS_INDEX}",
                               fix="Re-export the checkpoint with save_pretrained")
        shards = sorted({check_relative(str(s), where=f"{where}/{SAFETENSORS_INDEX}") for s in weight_map.values()})
        for shard in shards:
            if shard not in present:
                raise ConvertError(f"the index names shard {shard!r}, which is missing",
                                   where=f"{where}/{SAFETENSORS_INDEX}", fix="Download or restore the missing shard")
        return shards, {str(k): str(v) for k, v in weight_map.items()}
    if SINGLE_SHARD in present:
        return [SINGLE_SHARD], None
    if any(f.endswith(PICKLE_SUFFIXES) for f in files):
        raise ConvertError("only pickle weights (*.bin/*.pt) found; they are never unpickled", where=where,
                           fix="Convert the checkpoint to safetensors first (or use a repo that ships safetensors)")
    raise ConvertError("no safetensors weights found", where=where,
                       fix="Point at a folder or repo with model.safetensors or model.safetensors.index.json")
