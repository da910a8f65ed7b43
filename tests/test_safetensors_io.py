"""The safetensors reader and streaming writer: golden header bytes, round trips, and damage caught."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvfp4_convert import ConvertError
from nvfp4_convert.safetensors_io import (
    OutTensor,
    ShardWriter,
    header_length,
    layout,
    read_header,
    read_rows,
    shard_digest,
)


def test_layout_golden_bytes():
    head, offsets = layout([OutTensor("b", "U8", (2, 2)), OutTensor("a", "F32", ())])
    body = b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},' \
           b'"b":{"dtype":"U8","shape":[2,2],"data_offsets":[4,8]}}'
    body += b" " * (-len(body) % 8)
    assert head == struct.pack("<Q", len(body)) + body
    assert offsets == {"a": len(head), "b": len(head) + 4}  # larger elements first, so all are aligned


def test_writer_output_reads_back_with_safetensors(tmp_path):
    tensors = {"w": torch.arange(24, dtype=torch.uint8).view(4, 6), "s": torch.tensor(0.5),
               "h": torch.randn(3, 5).to(torch.bfloat16)}
    path = tmp_path / "x.safetensors"
    writer = ShardWriter(path, [OutTensor("w", "U8", (4, 6)), OutTensor("s", "F32", ()),
                                OutTensor("h", "BF16", (3, 5))])
    writer.write("w", tensors["w"][2:], at=12)  # out of order, in pieces
    writer.write("h", tensors["h"])
    writer.write("w", tensors["w"][:2])
    writer.write("s", tensors["s"])
    writer.commit()
    back = load_file(path)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert writer.digest() == shard_digest(path)
    assert torch.equal(read_rows(path, read_header(path), "w", 1, 3), tensors["w"][1:3])


def test_digest_changes_with_any_damage(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(64)}, path)
    before = shard_digest(path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    assert shard_digest(path) != before


@pytest.mark.parametrize("prefix,size,match", [
    (b"\x01\x02", 100, "shorter than 8 bytes"),
    (struct.pack("<Q", 200), 100, "does not fit a 100-byte file"),
    (struct.pack("<Q", 2**40), 2**41, "does not fit"),
])
def test_header_length_is_checked(prefix, size, match):
    with pytest.raises(ConvertError, match=match) as info:
        header_length(prefix, file_size=size, filename="x.safetensors")
    assert info.value.where == "x.safetensors" and "Re-download" in info.value.fix


def test_truncated_file_is_one_error(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ConvertError, match="truncated shard"):
        read_header(path)
