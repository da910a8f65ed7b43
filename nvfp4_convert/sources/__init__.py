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
    from .hub import HubSource

    return HubSource(src, revision=revision, token=token, endpoint=endpoint, work_dir=work_dir,
                     keep_source=keep_source)
