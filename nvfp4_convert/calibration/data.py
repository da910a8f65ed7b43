"""Calibration text: a local .txt/.jsonl/.parquet file or a Hub dataset, tokenized with the model's own tokenizer.

Texts are joined (separated by the tokenizer's end-of-sequence token) and cut into ``samples`` rows of exactly
``seq_len`` tokens, so no row is padded and every token is a real one. Hub datasets are read one data file at
a time, only until enough tokens are collected.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConvertError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja")
_SPLITS = ("train", "validation", "valid", "test", "dev", "eval")
_FIX_SIZE = "Give more text, or lower --calib-samples / --calib-seq-len"


@dataclass(frozen=True)
class CalibrationData:
    """Token ids ``[samples, seq_len]`` and where they came from (for the model card and resume checks)."""

    input_ids: torch.Tensor
    dataset: str
    column: str | None
    split: str | None

    @property
    def samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def fingerprint(self) -> str:
        """sha256 of the token ids: two runs with the same ids calibrate identically."""
        ids = self.input_ids.to(torch.int64).contiguous()
        return hashlib.sha256(ids.numpy().tobytes() + str(tuple(ids.shape)).encode()).hexdigest()


def load_tokenizer(source, *, where: str):
    """The model's own tokenizer from the source's files (never remote code)."""
    from transformers import AutoTokenizer

    present = [name for name in TOKENIZER_FILES if name in source.files]
    if not any(name in present for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")):
        raise ConvertError("the model has no tokenizer files (tokenizer.json, tokenizer.model, ...)", where=where,
                           fix="Calibration tokenizes text with the model's own tokenizer; "
                           "use a checkpoint that ships one")
    folder = None
    for name in present:
        folder = source.fetch_file(name).parent
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, ImportError, AttributeError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ConvertError(f"cannot load the model's tokenizer ({type(exc).__name__}: {first})",
                           where=where, fix="Fix the tokenizer files; custom tokenizer code is never run") from None


def load_calibration_data(data: str, *, tokenizer, samples: int, seq_len: int, column: str | None = None,
                          split: str | None = None, endpoint: str | None = None, token: str | None = None
                          ) -> CalibrationData:
    """Read ``data`` and return ``samples`` rows of ``seq_len`` token ids.

    Args:
        data: a ``.txt`` (whole file is text), ``.jsonl`` (one object per line) or ``.parquet`` file, or a Hub
            dataset id (``org/name``), whose data files of ``split`` are downloaded one at a time.
        tokenizer: the model's tokenizer.
        samples, seq_len: how many rows of how many tokens.
        column: the text column of ``.jsonl``/``.parquet``/Hub data (default ``text``).
        split: the Hub dataset split (default ``train``).
        endpoint, token: Hub endpoint and token for a Hub dataset.
    """
    if samples < 1 or seq_len < 1:
        raise ConvertError(f"--calib-samples and --calib-seq-len must be positive (got {samples}, {seq_len})",
                           where="--calibrate", fix="Use e.g. --calib-samples 128 --calib-seq-len 2048")
    path = Path(data).expanduser()
    if path.is_file():
        texts, where = _file_texts(path, column or "text"), str(path)
    elif path.suffix in TEXT_SUFFIXES or path.exists() or data.startswith((".", "/", "~")):
        raise ConvertError("no such calibration file", where=data,
                           fix=f"Give an existing {'/'.join(TEXT_SUFFIXES)} file or a Hub dataset id like org/name")
    else:
        texts, where = _hub_texts(data, column=column or "text", split=split or "train", endpoint=endpoint,
                                  token=token), f"{data} (split {split or 'train'})"
    needed = samples * seq_len
    ids = _token_stream(texts, tokenizer, needed, where=where)
    if len(ids) < needed:
        if not ids:
            raise ConvertError("the calibration data holds no text", where=where, fix=_FIX_SIZE)
        raise ConvertError(f"the calibration data holds {len(ids)} tokens, fewer than {samples} samples x "
                           f"{seq_len} tokens = {needed}", where=where, fix=_FIX_SIZE)
    input_ids = torch.tensor(ids[:needed], dtype=torch.int64).view(samples, seq_len)
    return CalibrationData(input_ids, dataset=data, column=None if path.suffix == ".txt" else column or "text",
                           split=None if path.is_file() else split or "train")


def _token_stream(texts: Iterator[str], tokenizer, needed: int, *, where: str) -> list[int]:
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        if not text.strip():
            continue
        if ids:
            ids.extend(separator)
        ids.extend(_tokens(text, tokenizer, needed - len(ids)))
        if len(ids) >= needed:
            break
    return ids


def _tokens(text: str, tokenizer, needed: int) -> list[int]:
    """The token ids of ``text``, or at least their first ``needed``: a long text is tokenized by growing
    prefixes cut at a line break (tokens never span one), so a large file costs what the samples need."""
    chars = max(needed * 8, 1 << 16)
    while chars < len(text):
        cut = text.rfind("\n", 0, chars)
        if cut <= 0:
            break
        ids = tokenizer(text[:cut], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) > needed + 64:  # well past the cut's neighbourhood: the first ``needed`` are final
            return ids
        chars *= 2
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _file_texts(path: Path, column: str) -> Iterator[str]:
    if path.suffix == ".txt":
        text = _read_text(path)
        return iter([text])
    if path.suffix == ".jsonl":
        return _jsonl_texts(path, column, where=str(path))
    if path.suffix == ".parquet":
        return _parquet_texts(path, column, where=str(path))
    raise ConvertError(f"unsupported calibration file type {path.suffix!r}", where=str(path),
                       fix=f"Use a {', '.join(TEXT_SUFFIXES)} file")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConvertError("the calibration file is not UTF-8 text", where=str(path),
                           fix="Re-save it as UTF-8") from None


def _jsonl_texts(path: Path, column: str, *, where: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConvertError(f"line {number} is not JSON ({exc.msg})", where=where,
                                   fix="Give one JSON object per line") from None
            if not isinstance(row, dict) or column not in row:
                keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
                raise ConvertError(f"line {number} has no column {column!r} (has: {keys})", where=where,
                                   fix="Pick the text column with --calib-column")
            if not isinstance(row[column], str):
                raise ConvertError(f"column {column!r} on line {number} is not text", where=where,
                                   fix="Pick the text column with --calib-column")
            yield row[column]


def _parquet_texts(path: Path, column: str, *, where: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConvertError("reading .parquet needs pyarrow", where=where, fix="pip install pyarrow") from None
    try:
        handle = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise ConvertError(f"not a readable parquet file ({exc})", where=where, fix="Re-download the file") from None
    names = handle.schema_arrow.names
    if column not in names:
        raise ConvertError(f"no column {column!r} (has: {', '.join(names)})", where=where,
                           fix="Pick the text column with --calib-column")
    for batch in handle.iter_batches(batch_size=256, columns=[column]):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise ConvertError(f"column {column!r} is not text", where=where,
                                   fix="Pick the text column with --calib-column")
            yield value or ""


def _hub_texts(repo_id: str, *, column: str, split: str, endpoint: str | None, token: str | None) -> Iterator[str]:
    """Texts of a Hub dataset split, reading its data files one at a time (each deleted after use)."""
    import tempfile

    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import httpx, validate_repo_id

    where = f"dataset {repo_id}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConvertError("no such calibration file, and not a Hub dataset id", where=repo_id,
                           fix=f"Give a {'/'.join(TEXT_SUFFIXES)} file or a Hub dataset id like org/name") from None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.dataset_info(repo_id)
    except RepositoryNotFoundError:
        raise ConvertError("the dataset does not exist or is not accessible", where=where,
                           fix="Check the id; for a gated or private dataset pass --token or set HF_TOKEN") from None
    except (HfHubHTTPError, OSError, httpx.TransportError) as exc:
        raise ConvertError(f"cannot reach the dataset ({type(exc).__name__})", where=where,
                           fix="Check the network (or use a local .txt/.jsonl/.parquet file)") from None
    files = sorted(s.rfilename for s in info.siblings or [] if s.rfilename.endswith(TEXT_SUFFIXES))
    chosen = [f for f in files if _in_split(f, split)]
    if not chosen and split == "train" and not any(_in_split(f, s) for f in files for s in _SPLITS):
        chosen = files  # a dataset without splits: all of it is "train", as the Hub's viewer treats it
    if not chosen:
        raise ConvertError(f"no {'/'.join(TEXT_SUFFIXES)} data files for split {split!r}", where=where,
                           fix=f"Pick a split with --calib-split (files: {', '.join(files[:6]) or 'none'})")

    def texts() -> Iterator[str]:
        with tempfile.TemporaryDirectory(prefix="nvfp4-calib-") as scratch:
            for filename in chosen:
                try:
                    local = Path(api.hf_hub_download(repo_id, filename, repo_type="dataset", revision=info.sha,
                                                     local_dir=scratch))
                except (HfHubHTTPError, OSError, httpx.TransportError) as exc:
                    raise ConvertError(f"cannot download {filename} ({type(exc).__name__})", where=where,
                                       fix="Check the network and re-run") from None
                try:
                    yield from _file_texts(local, column)
                finally:
                    local.unlink(missing_ok=True)

    return texts()


def _in_split(filename: str, split: str) -> bool:
    """Whether a data file belongs to ``split`` by the Hub's file-naming conventions."""
    parts = filename.lower().split("/")
    stem = parts[-1].rsplit(".", 1)[0]
    return split in parts[:-1] or stem == split or stem.startswith((f"{split}-", f"{split}_", f"{split}."))
