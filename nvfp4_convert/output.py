"""The output folder: a lock, atomic writes, the resume record, and never touching what is not ours.

A conversion records, in ``.nvfp4-convert/state.json``, what it is (a fingerprint of the source's
structure, the options and the tool version), every file it writes, and for each finished shard its
digest and the fingerprints of the source shards it was made from. Re-running the same command keeps
a finished shard only while its bytes and its sources are unchanged. Config files come last, so a
folder without ``config.json`` is never a finished checkpoint.

Replacing a previous conversion (``overwrite``) builds the new one in ``.nvfp4-convert/next/`` and
swaps it in only once it is complete; files that no conversion wrote are never deleted or replaced.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .config_fields import INFO_FIELDS, field_errors
from .errors import ConvertError
from .safetensors_io import shard_digest, write_error

STATE_DIR = ".nvfp4-convert"
FINAL_FILES = ("config.json", "hf_quant_config.json", "model.safetensors.index.json")
_LOCK = "lock"
_STAGING = "next"  # in STATE_DIR: a replacement conversion being built
# Files that make a checkpoint ambiguous when left next to another one's weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".gguf", ".h5", ".msgpack",
                   ".onnx", ".index.json")


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
        raise write_error(exc, path) from None


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


def _names(entries: list[str], limit: int = 5) -> str:
    """``"3 entries (a, b, c)"``: a count and the first few names."""
    shown = ", ".join(entries[:limit]) + (f" and {len(entries) - limit} more" if len(entries) > limit else "")
    return f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'} ({shown})"


class OutputDir:
    """The folder a conversion writes into, locked for as long as the object is open.

    ``root`` is the output folder; ``path`` is where files are written now: ``root`` itself, or a
    staging folder inside it while a previous conversion is being replaced.

    Args:
        path: the output folder (created if missing).
        fingerprint: what the conversion is; a different one is another conversion.
        files: every relative path the conversion writes.
        sources: for each output shard, ``{source shard: its fingerprint}``.
        overwrite: replace a previous, different conversion (only its own files).
        log: where a note about kept foreign files goes.
    """

    def __init__(self, path: Path, *, fingerprint: str, files: list[str], sources: dict[str, dict[str, str]],
                 overwrite: bool = False, log=print):
        self.root = Path(path)
        self.fingerprint = fingerprint
        self.files = list(dict.fromkeys(files))
        self.sources = sources
        self.state = {"fingerprint": fingerprint, "files": self.files, "shards": {}, "complete": False}
        self._state_dir = self.root / STATE_DIR
        self._lock = None
        self.staged = False
        self._replaced: list[str] = []  # the previous conversion's files, removed when the new one is done
        self._open_folder()
        try:
            self._prepare(overwrite, log)
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> Path:
        """Where files are written now."""
        return self._state_dir / _STAGING if self.staged else self.root

    @property
    def state_path(self) -> Path:
        return self._state_dir / ("next.json" if self.staged else "state.json")

    # -- opening: the folder and its lock ---------------------------------------------------------

    def _open_folder(self) -> None:
        path = self.root
        if path.is_symlink() and not path.exists():
            raise ConvertError("the output path is a link to something that does not exist", where=str(path),
                               fix="Remove the link or point it at a folder")
        if path.exists() and not path.is_dir():
            raise ConvertError("the output path is a file", where=str(path), fix="Choose a folder")
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            fresh_state = not self._state_dir.exists()
            self._state_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise ConvertError(f"cannot create the output folder: {exc.strerror or exc}", where=str(path),
                               fix="Choose a folder you can write to") from None
        self._created = created, fresh_state
        from filelock import FileLock, Timeout

        lock = FileLock(self._state_dir / _LOCK, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise ConvertError("another conversion is writing to this output folder", where=str(path),
                               fix="Wait for it to finish, or choose another folder") from None
        except OSError as exc:
            raise ConvertError(f"cannot lock the output folder: {exc.strerror or exc}", where=str(path),
                               fix="Choose a folder you can write to") from None
        self._lock = lock

    def close(self) -> None:
        """Release the lock (and tidy away what this object created in a folder it then refused)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _refuse(self, error: ConvertError) -> ConvertError:
        created, fresh_state = self._created
        self.close()
        if fresh_state:  # leave a refused folder exactly as it was
            shutil.rmtree(self._state_dir, ignore_errors=True)
            if created:
                self.root.rmdir()
        return error

    # -- deciding: resume, start, or replace ------------------------------------------------------

    def _prepare(self, overwrite: bool, log) -> None:
        previous = self._read_state(self._state_dir / "state.json")
        if previous is not None and previous.get("fingerprint") == self.fingerprint:
            self._resume(previous)
            return
        ours = {*self._written_by(previous), *FINAL_FILES} if previous is not None else set()
        present = self._present()
        foreign = [f for f in present if f not in ours and f.removesuffix(".partial") not in ours]
        held = sorted({f.split("/")[0] + ("/" if "/" in f else "") for f in foreign})
        if not overwrite and (previous is not None or present):
            if previous is not None:
                what = "another conversion" + (f" and {_names(held)} that no conversion wrote" if held else "")
                fix = ("Use another folder, or pass --overwrite to replace that conversion's files once the new one "
                       "is complete" + (" (the other entries are kept)" if held else ""))
            else:
                what = f"{_names(held)} that no conversion wrote"
                fix = ("Use an empty or new folder, or pass --overwrite to write the checkpoint next to them "
                       "(they are kept)")
            raise self._refuse(ConvertError(f"the output folder holds {what}", where=str(self.root), fix=fix))
        in_the_way = sorted(f for f in foreign if f in self.files or f.endswith(WEIGHT_SUFFIXES))
        if in_the_way:
            raise self._refuse(ConvertError(
                f"the output folder holds files no conversion wrote that this one would replace or mix with: "
                f"{', '.join(in_the_way[:5])}" + (" ..." if len(in_the_way) > 5 else ""), where=str(self.root),
                fix="Move them away or choose another folder; --overwrite replaces only a previous conversion's files"))
        if held:
            log(f"note: keeping {_names(held)} in the output folder that no conversion wrote")
        self._replaced = sorted(f for f in ours if (self.root / f).exists())
        if self._replaced:  # build the new conversion aside; the previous one stays until it is complete
            self.staged = True
            staged = self._read_state(self.state_path)
            if staged is not None and staged.get("fingerprint") == self.fingerprint:
                self._resume(staged)
                return
            shutil.rmtree(self.path, ignore_errors=True)
        self._start()

    def _resume(self, previous: dict) -> None:
        shards = previous.get("shards", {})
        self.state["shards"] = {k: v for k, v in shards.items() if isinstance(v, dict)}
        # Files recorded by an earlier run (a swap cut short) stay ours until the end.
        self.state["files"] = list(dict.fromkeys([*self.files, *previous.get("files", [])]))
        if not self.staged:
            shutil.rmtree(self._state_dir / _STAGING, ignore_errors=True)
            (self._state_dir / "next.json").unlink(missing_ok=True)
        self._start()

    def _start(self) -> None:
        for name in self.state["files"]:
            (self.path / name).with_name(Path(name).name + ".partial").unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self._save()

    def _present(self) -> list[str]:
        """Every file, link and empty folder in the folder (the resume record aside), as relative POSIX paths."""
        found = []
        for root, dirs, names in os.walk(self.root):
            rel = Path(root).relative_to(self.root)
            if rel == Path("."):
                dirs[:] = [d for d in dirs if d != STATE_DIR]
            links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
            dirs[:] = [d for d in dirs if d not in links]
            found += [(rel / n).as_posix() for n in (*links, *names)]
            if rel != Path(".") and not dirs and not names and not links:
                found.append(rel.as_posix() + "/")
        return sorted(found)

    @staticmethod
    def _written_by(state: dict) -> list[str]:
        files = state.get("files")
        names = [f for f in files if isinstance(f, str)] if isinstance(files, list) else []
        shards = state.get("shards")
        return names + (list(shards) if isinstance(shards, dict) else [])

    @staticmethod
    def _read_state(path: Path) -> dict | None:
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"fingerprint": None}
        return state if isinstance(state, dict) else {"fingerprint": None}

    def _save(self) -> None:
        write_json_atomic(self.state_path, self.state)

    # -- during the conversion --------------------------------------------------------------------

    def finished(self, filename: str) -> bool:
        """Whether ``filename`` was finished from the same source data and is still intact on disk."""
        recorded = self.state["shards"].get(filename)
        path = self.path / filename
        if recorded is None or not path.is_file():
            return False
        intact = recorded.get("sources") == self.sources.get(filename, {})
        try:
            intact = intact and shard_digest(path) == recorded.get("digest")
        except ConvertError:  # not even a readable header any more
            intact = False
        if not intact:
            del self.state["shards"][filename]
            self._save()
            return False
        return True

    def record(self, filename: str, digest: str) -> None:
        """Remember that ``filename`` is complete, with its :func:`shard_digest` and its sources."""
        self.state["shards"][filename] = {"digest": digest, "sources": self.sources.get(filename, {})}
        self._save()

    def mark_complete(self, info: dict) -> None:
        """Finish: swap a staged conversion in, drop stale files of ours, record what it was.

        ``info`` is read back by ``push`` for the model card.
        """
        if self.staged:
            self._swap_in()
        for name in set(self.state["files"]) - set(self.files):  # ours, from an earlier run, not made now
            (self.root / name).unlink(missing_ok=True)
        self.state.update(files=self.files, complete=True, info=info)
        self._save()

    def _swap_in(self) -> None:
        """Replace the previous conversion's files by the staged ones, config.json last."""
        staging, self.staged = self.path, False
        self.state["files"] = list(dict.fromkeys([*self.files, *self._replaced]))
        self._save()  # from here the folder is this conversion, resumable in place
        try:
            for name in sorted(self._replaced, key=lambda n: n != "config.json"):  # no longer looks finished
                (self.root / name).unlink(missing_ok=True)
            for stale in self._state_dir.iterdir():  # what the previous conversion kept here (its card's license)
                if stale.name not in (_LOCK, _STAGING, "state.json", "next.json"):
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            for name in sorted(self.files, key=lambda n: (n in FINAL_FILES, n == "config.json")):
                target = self.root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / name, target)
        except OSError as exc:
            raise write_error(exc, self.root) from None
        shutil.rmtree(staging, ignore_errors=True)
        (self._state_dir / "next.json").unlink(missing_ok=True)


def read_conversion_info(path: Path) -> dict | None:
    """What :meth:`OutputDir.mark_complete` recorded in ``path``, or None if it is not a finished conversion."""
    try:
        state = json.loads((Path(path) / STATE_DIR / "state.json").read_text())
    except (OSError, ValueError):
        return None
    info = state.get("info") if isinstance(state, dict) and state.get("complete") else None
    return info if isinstance(info, dict) and not field_errors(info, INFO_FIELDS) else None


def conversion_files(path: Path) -> list[str]:
    """Every file a finished conversion in ``path`` wrote (relative POSIX paths), or [] if there is none."""
    try:
        state = json.loads((Path(path) / STATE_DIR / "state.json").read_text())
    except (OSError, ValueError):
        return []
    files = state.get("files") if isinstance(state, dict) and state.get("complete") else None
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else []
