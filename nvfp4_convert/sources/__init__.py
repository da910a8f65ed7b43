"""Checkpoint sources: a local folder or a Hugging Face Hub repo."""

from __future__ import annotations

from pathlib import Path

from .base import ShardHeader, Source, TensorInfo
from .local import LocalSource

__all__ = ["LocalSource", "ShardHeader", "Source", "TensorInfo", "open_source"]


def open_source(src: str, *, revision: str | None = None, token: str | None = None,
                endpoint: str | None = None, work_dir: Path | None = None, keep_source: bool = False) -> Source:
    """A local folder if ``src`` is one, else a Hub repo id."""
    if Path(src).expanduser().is_dir():
        return LocalSource(Path(src).expanduser())
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from ..errors import ConvertError
    from .hub import HubSource

    try:
        validate_repo_id(src)
    except HFValidationError:
        raise ConvertError("no such folder, and not a Hub repo id", where=src,
                           fix="Give an existing checkpoint folder or a repo id like org/model") from None

    return HubSource(src, revision=revision, token=token, endpoint=endpoint, work_dir=work_dir,
                     keep_source=keep_source)
