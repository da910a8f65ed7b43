"""The output folder: atomic writes, the resume record, and refusing to mix two conversions.

A conversion records, in ``.nvfp4-convert/state.json``, what it is (a fingerprint of source, options
and tool version) and the sha256 of every shard it finished. Re-running the same command skips those
shards; config files come last, so a folder without ``config.json`` is never a finished checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConvertError
from .safetensors_io import shard_digest

STATE_DIR = ".nvfp4-convert"
FINAL_FILES = ("config.json", "hf_quant_config.json", "model.safetensors.index.json")


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; it replaces ``path`` only if the block succeeds."""
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield partial
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ConvertError(f"cannot write: {exc.strerror}", where=str(path),
                           fix="Free disk space or fix permissions, then re-run to resume") from None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename."""
    with _replacing(path) as partial, open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, doc: dict, *, indent: int = 2) -> None:
    write_bytes_atomic(path, (json.dumps(doc, indent=indent) + "\n").encode())


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` via a temporary file, fsync and rename."""
    with _replacing(dst) as partial:
        shutil.copyfile(src, partial)
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())


class OutputDir:
    """The folder a conversion writes into, with its resume record."""

    def __init__(self, path: Path, *, fingerprint: str, overwrite: bool = False):
        self.path = Path(path)
        self.state_path = self.path / STATE_DIR / "state.json"
        self.fingerprint = fingerprint
        self.state = {"fingerprint": fingerprint, "shards": {}, "complete": False}
        self._prepare(overwrite)

    def _prepare(self, overwrite: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ConvertError("output path is a file", where=str(self.path), fix="Choose a folder")
        existing = [p for p in self.path.iterdir() if p.name != STATE_DIR] if self.path.is_dir() else []
        previous = self._read_state()
        if previous is not None and previous.get("fingerprint") == self.fingerprint:
            self.state["shards"] = dict(previous.get("shards", {}))
        elif existing or previous is not None:
            if not overwrite:
                what = "another conversion" if previous is not None else "files from something else"
                raise ConvertError(f"the output folder holds {what}", where=str(self.path),
                                   fix="Use another folder, or pass --overwrite to replace it")
            self._clear()
        for stale in self.path.glob("**/*.partial") if self.path.is_dir() else []:
            stale.unlink()
        (self.path / STATE_DIR).mkdir(parents=True, exist_ok=True)
        self._save()

    def _read_state(self) -> dict | None:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {"fingerprint": None}

    def _clear(self) -> None:
        for p in self.path.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _save(self) -> None:
        write_json_atomic(self.state_path, self.state)

    def finished(self, filename: str, *, verify: bool = True) -> bool:
        """Whether ``filename`` was finished by this conversion and is still intact on disk."""
        expected = self.state["shards"].get(filename)
        path = self.path / filename
        if expected is None or not path.is_file():
            return False
        try:
            intact = not verify or shard_digest(path) == expected
        except ConvertError:  # not even a readable header any more
            intact = False
        if not intact:
            del self.state["shards"][filename]
            self._save()
            return False
        return True

    def record(self, filename: str, digest: str) -> None:
        """Remember that ``filename`` is complete, with its :func:`shard_digest`."""
        self.state["shards"][filename] = digest
        self._save()

    def mark_complete(self, info: dict) -> None:
        """Record that the conversion finished, with what it was (read back by ``push`` for the card)."""
        self.state["complete"] = True
        self.state["info"] = info
        self._save()


def read_conversion_info(path: Path) -> dict | None:
    """What :meth:`OutputDir.mark_complete` recorded in ``path``, or None if it is not a finished conversion."""
    try:
        state = json.loads((Path(path) / STATE_DIR / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return state.get("info") if state.get("complete") else None
