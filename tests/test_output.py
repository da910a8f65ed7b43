"""Atomic writes: a file under its final name is always complete, and a failed write leaves nothing."""

from __future__ import annotations

import errno
import json
import os

import pytest

from nvfp4_convert import ConvertError
from nvfp4_convert.output import copy_atomic, write_bytes_atomic, write_json_atomic


def test_atomic_writes_replace_whole_files(tmp_path):
    target = tmp_path / "sub" / "a.json"
    write_json_atomic(target, {"x": 1})
    write_json_atomic(target, {"x": 2}, indent=4)
    assert json.loads(target.read_text()) == {"x": 2}
    write_bytes_atomic(tmp_path / "b.bin", b"abc")
    copy_atomic(tmp_path / "b.bin", tmp_path / "c.bin")
    assert (tmp_path / "c.bin").read_bytes() == b"abc"
    assert not list(tmp_path.rglob("*.partial"))


def test_failed_write_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    write_bytes_atomic(tmp_path / "a.bin", b"old")

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(ConvertError) as info:
        write_bytes_atomic(tmp_path / "a.bin", b"new")
    assert "disk full" in info.value.what or "No space" in info.value.line()
    assert (tmp_path / "a.bin").read_bytes() == b"old"  # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]  # and no partial file is left
