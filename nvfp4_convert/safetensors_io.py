"""Safetensors headers, checked, and a writer that streams tensors into a pre-laid-out file.

The ``safetensors`` package reads data (``safe_open``) but can only write whole dicts held in memory;
the converter writes shards far larger than the memory it may use, so it lays out the header from
the plan and fills each tensor's byte range as it is produced.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import FIX_SHARD, ConvertError

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "I16": torch.int16, "F16": torch.float16, "BF16": torch.bfloat16,
    "I32": torch.int32, "F32": torch.float32, "I64": torch.int64, "F64": torch.float64,
}  # fmt: skip
FLOAT_DTYPES = ("F16", "BF16", "F32")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it (no data)."""

    name: str
    dtype: str  # safetensors dtype string: "BF16", "F16", "F32", "F8_E4M3", "U8", ...
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]  # relative to the start of the data buffer

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]


@dataclass(frozen=True)
class ShardHeader:
    """The parsed header of one ``.safetensors`` file."""

    filename: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # byte offset of the data buffer in the file (8 + header length)
    file_size: int


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how a (possibly lone) surrogate is written in JSON


def is_valid_unicode(doc) -> bool:
    """Whether every string in a parsed JSON document encodes to UTF-8 (JSON can spell lone surrogates)."""
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_json(path: Path, *, filename: str, where: str, fix: str):
    """Parse a small JSON file (config, index) or raise one ConvertError line saying what is wrong with it."""
    try:
        text = path.read_text(encoding="utf-8")
        doc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{filename} is not valid JSON ({exc})", where=where, fix=fix) from None
    except RecursionError:
        raise ConvertError(f"{filename} is not valid JSON (nested too deeply)", where=where, fix=fix) from None
    if "\\u" in text and not is_valid_unicode(doc):
        raise ConvertError(f"{filename} holds text that is not valid Unicode (a lone surrogate)", where=where, fix=fix)
    return doc


def parse_header(raw: bytes, *, filename: str, file_size: int) -> ShardHeader:
    """Check and parse the JSON header bytes (without the 8-byte length prefix) of ``filename``."""
    where = filename

    def bad(what: str) -> ConvertError:
        return ConvertError(f"corrupt safetensors header: {what}", where=where,
                            fix=FIX_SHARD)

    def no_duplicates(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ConvertError(f"duplicate tensor name {key!r}", where=where,
                                   fix="Re-export the checkpoint; each tensor name must appear once")
            seen[key] = value
        return seen

    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise bad("JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    if _SURROGATE_ESCAPE.search(raw) and not is_valid_unicode(doc):
        raise bad("a name or value is not valid Unicode (a lone surrogate)")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise bad("__metadata__ is not an object")
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        dtype, shape, offsets = (entry.get(k) for k in ("dtype", "shape", "data_offsets")) if isinstance(entry, dict) \
            else (None, None, None)
        if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list):
            raise bad(f"entry for {name!r} lacks a string dtype, a list shape or list data_offsets")
        if dtype not in DTYPE_SIZES:
            raise ConvertError(f"tensor {name!r} has unsupported dtype {dtype}", where=where,
                               fix="Only standard safetensors dtypes can be converted")
        if not all(type(d) is int and 0 <= d < 2**63 for d in shape) or len(offsets) != 2 or \
                not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
            raise bad(f"bad shape or offsets for {name!r} (they must be non-negative integers)")
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise bad(f"{name!r} is {dtype}{list(shape)} but its offsets span {end - begin} bytes")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), (begin, end))
    cursor = 0
    for info in sorted(tensors.values(), key=lambda t: t.data_offsets):
        if info.data_offsets[0] != cursor:
            raise bad(f"tensor data overlaps or leaves a gap at {info.name!r}")
        cursor = info.data_offsets[1]
    if cursor > data_len:
        raise ConvertError(f"truncated shard: header promises {cursor} data bytes, file has {data_len}",
                           where=where, fix=FIX_SHARD)
    if cursor < data_len:
        raise bad(f"{data_len - cursor} trailing bytes after the last tensor")
    return ShardHeader(filename, tensors, {str(k): str(v) for k, v in metadata.items()}, data_start, file_size)


def header_length(prefix: bytes, *, file_size: int, filename: str) -> int:
    """The JSON header's length from a file's first 8 bytes, checked against the file's size."""
    if len(prefix) < 8:
        raise ConvertError("truncated shard: shorter than 8 bytes", where=filename, fix=FIX_SHARD)
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > _MAX_HEADER or 8 + length > file_size:
        raise ConvertError(f"corrupt safetensors header: length {length} does not fit a {file_size}-byte file",
                           where=filename, fix=FIX_SHARD)
    return length


def read_header(path: Path, *, filename: str | None = None) -> ShardHeader:
    """Read and check the header of a local ``.safetensors`` file (no tensor data is read)."""
    filename = filename or path.name
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = header_length(f.read(8), file_size=size, filename=filename)
        raw = f.read(length)
    return parse_header(raw, filename=filename, file_size=size)


def read_tensor_bytes(path: Path, header: ShardHeader, name: str, start: int = 0, stop: int | None = None,
                      *, out: memoryview | None = None) -> bytearray | memoryview:
    """Raw bytes ``[start, stop)`` of tensor ``name`` (relative to the tensor's own data).

    With ``out`` (a writable buffer of the right length, e.g. pinned memory) the bytes land there.
    """
    info = header.tensors[name]
    stop = info.nbytes if stop is None else stop
    buf = bytearray(stop - start) if out is None else out
    view = memoryview(buf).cast("B")
    if len(view) != stop - start:
        raise ValueError("output buffer has the wrong size")
    with open(path, "rb", buffering=0) as f:
        f.seek(header.data_start + info.data_offsets[0] + start)
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise ConvertError("truncated shard while reading tensor data", where=f"{header.filename}:{name}",
                                   fix=FIX_SHARD)
            got += n
    return buf


def read_tensor(path: Path, header: ShardHeader, name: str) -> torch.Tensor:
    """The whole tensor ``name`` as a torch tensor of its dtype (raw bytes for dtypes torch lacks)."""
    info = header.tensors[name]
    raw = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        read_tensor_bytes(path, header, name, out=raw.numpy().data)
    return raw.view(TORCH_DTYPES[info.dtype]).view(info.shape) if info.dtype in TORCH_DTYPES else raw


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14


def map_tensor(path: Path, header: ShardHeader, name: str) -> torch.Tensor:
    """Tensor ``name`` backed by a private read-only mapping of its bytes (no copy), pages faulted in now.

    Cheaper than reading when the file is in the page cache; the mapping lives as long as the tensor.
    """
    info = header.tensors[name]
    if not info.nbytes or info.dtype not in TORCH_DTYPES:
        return read_tensor(path, header, name)
    start = header.data_start + info.data_offsets[0]
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < start + info.nbytes:  # mapped bytes past EOF would SIGBUS
            raise ConvertError("truncated shard while reading tensor data", where=f"{header.filename}:{name}",
                               fix=FIX_SHARD)
        mapping = mmap.mmap(f.fileno(), info.nbytes + start - aligned, offset=aligned, access=mmap.ACCESS_COPY)
    try:
        mapping.madvise(_MADV_POPULATE_READ)
    except (OSError, ValueError):
        mapping.madvise(mmap.MADV_WILLNEED)
    data = torch.frombuffer(memoryview(mapping)[start - aligned :], dtype=torch.uint8)
    return data.view(TORCH_DTYPES[info.dtype]).view(info.shape)


def read_rows(path: Path, header: ShardHeader, name: str, row_start: int, row_stop: int) -> torch.Tensor:
    """Rows ``[row_start, row_stop)`` of the 2-D tensor ``name`` as a torch tensor of its dtype."""
    info = header.tensors[name]
    row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
    buf = read_tensor_bytes(path, header, name, row_start * row_bytes, row_stop * row_bytes)
    return torch.frombuffer(buf, dtype=TORCH_DTYPES[info.dtype]).view(row_stop - row_start, *info.shape[1:])


@dataclass(frozen=True)
class OutTensor:
    """A tensor the writer will hold: name, safetensors dtype, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "nbytes", math.prod(self.shape) * DTYPE_SIZES[self.dtype])


def layout(tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """Header bytes (with length prefix, space-padded to 8) and each tensor's absolute file offset.

    Tensors are ordered by decreasing element size, then name, as the safetensors serializer does, so
    every tensor is naturally aligned.
    """
    ordered = sorted(tensors, key=lambda t: (-DTYPE_SIZES[t.dtype], t.name))
    doc: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offsets, cursor = {}, 0
    for t in ordered:
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [cursor, cursor + t.nbytes]}
        offsets[t.name] = cursor
        cursor += t.nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    return head, {name: len(head) + off for name, off in offsets.items()}


class ShardWriter:
    """Writes one output shard: header first, then tensors in any order at their planned offsets.

    The file is built as ``<name>.partial`` and renamed into place by :meth:`commit`, so a shard under
    its final name is always complete. There is no fsync: resuming re-hashes every finished shard
    against its recorded :func:`shard_digest`, which catches a shard lost to a power cut as well. The
    digest is computed as the bytes go out, so finishing a shard costs no second read.
    """

    def __init__(self, path: Path, tensors: list[OutTensor]):
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        head, self.offsets = layout(tensors)
        self.head = head
        self.sizes = {t.name: t.nbytes for t in tensors}
        self._hashing = {t.name: [0, 0] for t in tensors}  # running CRC-32, bytes hashed
        self.total = len(head) + sum(self.sizes.values())
        self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(self.fd, self.total)
            self._pwrite(head, 0)
        except OSError as exc:
            self.abort()
            raise write_error(exc, path) from None

    def write(self, name: str, data: bytes | bytearray | memoryview | torch.Tensor, at: int = 0) -> None:
        """Write ``data`` into tensor ``name`` starting at byte ``at`` of that tensor."""
        if isinstance(data, torch.Tensor):
            data = data.contiguous().reshape(-1).view(torch.uint8).numpy().data if data.numel() else b""
        view = memoryview(data).cast("B")
        if at + len(view) > self.sizes[name]:
            raise ValueError(f"write past the end of {name}")
        running = self._hashing[name]
        if running[1] == at:  # in order: extend the running CRC; otherwise it is re-read in digest()
            running[0] = zlib.crc32(view, running[0])
            running[1] += len(view)
        try:
            self._pwrite(view, self.offsets[name] + at)
        except OSError as exc:
            self.abort()
            raise write_error(exc, self.path) from None

    def _pwrite(self, view, offset: int) -> None:
        view = memoryview(view)
        while len(view):
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def commit(self) -> None:
        """Move the finished shard to its final name."""
        try:
            os.close(self.fd)
            self.fd = -1
            os.replace(self.partial, self.path)
        except OSError as exc:
            self.abort()
            raise write_error(exc, self.path) from None

    def digest(self) -> str:
        """:func:`shard_digest` of the finished shard (call after every write)."""
        parts = []
        for name in sorted(self.offsets, key=self.offsets.get):
            crc, hashed = self._hashing[name]
            if hashed != self.sizes[name]:
                crc = _crc_range(self.partial if self.fd >= 0 else self.path, self.offsets[name], self.sizes[name])
            parts.append(crc.to_bytes(4, "little"))
        return hashlib.sha256(self.head + b"".join(parts)).hexdigest()

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.partial.unlink(missing_ok=True)


def _crc_range(path: Path, start: int, length: int) -> int:
    crc = 0
    with open(path, "rb") as f:
        f.seek(start)
        while length > 0:
            chunk = f.read(min(length, 16 * 1024 * 1024))
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            length -= len(chunk)
    return crc


def shard_digest(path: Path) -> str:
    """sha256 over a shard's header and the CRC-32 of each tensor's bytes, in file order.

    Cheap enough to compute while writing (:class:`ShardWriter` does), and it changes with any header
    edit and with any truncated, zeroed or otherwise damaged tensor data.
    """
    header = read_header(path)
    parts = [_crc_range(path, header.data_start + t.data_offsets[0], t.nbytes).to_bytes(4, "little")
             for t in sorted(header.tensors.values(), key=lambda t: t.data_offsets)]
    with open(path, "rb") as f:
        head = f.read(header.data_start)
    return hashlib.sha256(head + b"".join(parts)).hexdigest()


SAMPLE_BLOCKS = 64  # evenly spaced blocks of the data section
SAMPLE_BLOCK_BYTES = 4096
SAMPLE_TENSOR_BYTES = 64  # from the start of every tensor


def sampled_digest(path: Path, header: ShardHeader) -> str:
    """sha256 over a sample of a shard's tensor data: the first 64 bytes of every tensor and 64 evenly
    spaced 4 KiB blocks (about 256 KiB plus 64 bytes a tensor, whatever the shard's size).

    Any re-export or replacement of the weights changes it (two different trainings agree in no
    sampled byte); together with size and mtime it tells a changed local source without reading it.
    """
    digest = hashlib.sha256()
    data_len = header.file_size - header.data_start
    ordered = sorted(header.tensors.values(), key=lambda t: t.data_offsets)
    starts = [header.data_start + t.data_offsets[0] for t in ordered]
    reads = [(s, SAMPLE_TENSOR_BYTES) for s in starts]
    if data_len > 0:
        step = max(data_len // SAMPLE_BLOCKS, 1)
        reads += [(header.data_start + i * step, SAMPLE_BLOCK_BYTES)
                  for i in range(SAMPLE_BLOCKS) if i * step < data_len]
    with open(path, "rb") as f:
        for start, length in sorted(reads):
            f.seek(start)
            digest.update(f.read(length))
    return digest.hexdigest()


def write_error(exc: OSError, path: Path) -> ConvertError:
    """The one line for a failed write: disk full, or whatever else the OS refused."""
    import errno

    if exc.errno == errno.ENOSPC:
        return ConvertError("disk full while writing", where=str(path),
                            fix="Free space (see --dry-run for the output size) and re-run the same command to resume")
    return ConvertError(f"cannot write: {exc.strerror or exc}", where=str(path),
                        fix="Check the output folder's permissions and free space, then re-run to resume")
