"""A checkpoint in a local folder, read in place."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConvertError
from ..safetensors_io import load_json, read_header, sampled_digest
from .base import ShardHeader, check_relative, structure_fingerprint, weight_shards


class LocalSource:
    """A folder holding ``config.json`` and safetensors shards; nothing is copied or deleted."""

    revision = None

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.description = str(self.root)
        if not self.root.is_dir():
            raise ConvertError("source folder not found", where=str(root), fix="Give a folder or a Hub repo id")
        self._files = sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
        )
        self._headers: dict[str, ShardHeader] | None = None
        self.shards, self.weight_map = weight_shards(self._files, self.read_json, where=self.description)
        self._check_links()

    def _check_links(self) -> None:
        """Only weight shards may lead out of the folder, and other files only into the cache's blobs.

        Every other file is copied into the output (and uploaded by ``push``), so a link to anything
        outside the checkpoint could leak it. In a Hugging Face cache snapshot
        (``models--org--name/snapshots/<commit>/``) every file is a link into ``models--org--name/blobs``,
        which is the same repo and fine.
        """
        allowed = [self.root]
        repo = self.root.parent.parent
        if self.root.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--", "spaces--")):
            allowed.append(repo / "blobs")
        shards = set(self.shards)
        for name in self._files:
            path = self.root / name
            real = path.resolve()
            if name not in shards and real != path and not any(real.is_relative_to(a) for a in allowed):
                raise ConvertError(f"{name} is a link to {real}, outside the checkpoint", where=self.description,
                                   fix="Copy the file into the folder; only weight shards may link out of it "
                                   "(and any file into a Hugging Face cache's blobs)")

    @property
    def files(self) -> list[str]:
        return list(self._files)

    def _path(self, filename: str) -> Path:
        # Names are checked, links are followed (see _check_links for which may leave the folder).
        check_relative(filename, where=self.description)
        return self.root / filename

    def read_json(self, filename: str) -> dict:
        path = self._path(filename)
        if not path.is_file():
            raise ConvertError(f"{filename} is missing", where=self.description,
                               fix="A Hugging Face checkpoint folder needs config.json")
        return load_json(path, filename=filename, where=self.description, fix="Fix or re-download the file")

    def fetch_file(self, filename: str) -> Path:
        return self._path(filename)

    def headers(self) -> dict[str, ShardHeader]:
        if self._headers is None:
            self._headers = {s: read_header(self._path(s), filename=s) for s in self.shards}
        return self._headers

    def prefetch(self, filename: str) -> None:
        pass

    def acquire(self, filename: str, *, checked: bool = True) -> Path:
        return self._path(filename)

    def check(self, filename: str) -> None:
        pass

    def release(self, filename: str) -> None:
        pass

    def fingerprint(self) -> str:
        config = self._path("config.json").read_bytes() if "config.json" in self._files else b""
        return structure_fingerprint("local", config, self.headers())

    def shard_fingerprints(self) -> dict[str, str]:
        """Size, modification time (ns) and :func:`sampled_digest` of each shard (links followed)."""
        prints = {}
        for name, header in self.headers().items():
            path = self._path(name)
            st = path.stat()
            prints[name] = f"{st.st_size}:{st.st_mtime_ns}:{sampled_digest(path, header)}"
        return prints

    def local_roots(self) -> list[Path]:
        return [self.root]

    def local_files(self) -> list[Path]:
        return [self.root / name for name in self._files]

    def close(self) -> None:
        pass
