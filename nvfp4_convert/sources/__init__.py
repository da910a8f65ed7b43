"""Checkpoint sources: a local folder or a Hugging Face Hub repo (read from the Hugging Face cache when it is there)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConvertError
from .base import ShardHeader, Source, TensorInfo
from .local import LocalSource

__all__ = ["LocalSource", "ShardHeader", "Source", "TensorInfo", "open_source"]


def open_source(src: str, *, revision: str | None = None, token: str | None = None,
                endpoint: str | None = None, work_dir: Path | None = None, keep_source: bool = False) -> Source:
    """A local folder if ``src`` is one, else a Hub repo id.

    A repo is read the way ``hf_hub_download`` reads files: with ``HF_HUB_OFFLINE`` set, or when the Hub
    cannot be reached, a revision in the Hugging Face cache is converted from there with no network;
    online, cached files of the pinned commit are used in place and only the missing ones downloaded.
    """
    path = Path(src).expanduser()
    if path.is_dir():
        _refuse_cache_folder(path)
        return LocalSource(path)
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from ..hub_errors import HubUnreachable
    from .hub import HubSource

    try:
        validate_repo_id(src)
    except HFValidationError:
        raise ConvertError("no such folder, and not a Hub repo id", where=src,
                           fix="Give an existing checkpoint folder or a repo id like org/model") from None
    if constants.HF_HUB_OFFLINE:
        return _cached_snapshot(src, revision, why="HF_HUB_OFFLINE is set")
    try:
        return HubSource(src, revision=revision, token=token, endpoint=endpoint, work_dir=work_dir,
                         keep_source=keep_source)
    except HubUnreachable as exc:
        try:
            return _cached_snapshot(src, revision, why=exc.what)
        except ConvertError:
            raise exc from None


def _cached_snapshot(repo_id: str, revision: str | None, *, why: str) -> LocalSource:
    """The Hugging Face cache's snapshot of ``repo_id`` at ``revision``, as a source that names the repo."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    asked = f"{repo_id}@{revision or 'main'}"
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ConvertError(f"{why}, and {asked} is not in the Hugging Face cache", where=repo_id,
                           fix="Connect to download it (unset HF_HUB_OFFLINE), or convert from a local folder"
                           ) from None
    sha = folder.name
    try:
        source = LocalSource(folder)
    except ConvertError as exc:
        raise ConvertError(f"{why}, and the cached {asked} is incomplete: {exc.what}", where=str(folder),
                           fix="Connect to download what is missing (unset HF_HUB_OFFLINE)") from None
    source.revision, source.description = sha, f"{repo_id}@{sha[:12]}"
    return source


def _refuse_cache_folder(path: Path) -> None:
    """A ``models--org--name`` folder of the Hugging Face cache is not a checkpoint: point to its snapshots."""
    if not (path.name.startswith("models--") and (path / "snapshots").is_dir()):
        return
    repo_id = path.name[len("models--"):].replace("--", "/", 1)
    snapshots = sorted(p for p in (path / "snapshots").iterdir() if p.is_dir())
    where = f"{snapshots[-1]}" if len(snapshots) == 1 else f"{path / 'snapshots'}/<commit>"
    raise ConvertError("this is a Hugging Face cache folder, not a checkpoint", where=str(path),
                       fix=f"Give the repo id {repo_id} (its cached files are used) or a snapshot folder: {where}")
