"""convert -> verify -> push against the loopback fake Hub, and the generated model card."""

from __future__ import annotations

import shutil
from pathlib import Path
from unittest import mock

import pytest
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from nvfp4_convert import ConvertError, convert
from nvfp4_convert.cli import app
from nvfp4_convert.output import STATE_DIR
from nvfp4_convert.publish import push
from nvfp4_convert.verify import verify

TOKEN = "hf_fakeTokenThatMustNeverLeak0123456789"
SOURCE_CARD = ("---\nlicense: other\nlicense_name: tiny-license\nlicense_link: https://example.com/LICENSE\n---\n"
               "# tiny\n")


@pytest.fixture(scope="module")
def tiny_llama(tiny, tmp_path_factory) -> Path:
    src = Path(shutil.copytree(tiny("llama"), tmp_path_factory.mktemp("src") / "tiny-llama"))
    (src / "README.md").write_text(SOURCE_CARD)
    return src


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _no_token(*texts: str | bytes) -> None:
    for text in texts:
        assert (TOKEN.encode() if isinstance(text, bytes) else TOKEN) not in text


def test_convert_verify_push_end_to_end(fake_hub, tiny_llama, tmp_path):
    sha = fake_hub.add_repo("org/tiny-llama", tiny_llama)
    out = tmp_path / "out"
    out.mkdir()
    (out / "my-notes.txt").write_text("private")  # kept in the folder, never uploaded
    convert("org/tiny-llama", out, token=TOKEN, endpoint=fake_hub.url, backend="reference", progress=False,
            command=f"nvfp4-convert org/tiny-llama {out} --token ***", overwrite=True)
    assert verify(out, source="org/tiny-llama", token=TOKEN, endpoint=fake_hub.url, progress=False).ok

    url = push(out, "me/tiny-llama-nvfp4", token=TOKEN, endpoint=fake_hub.url)

    assert url.endswith("/me/tiny-llama-nvfp4")
    uploaded = fake_hub.uploaded("me/tiny-llama-nvfp4")
    local = _files(out)
    assert local.pop("my-notes.txt") == b"private"
    assert any(name.startswith(f"{STATE_DIR}/") for name in local)
    assert uploaded == {name: data for name, data in local.items() if not name.startswith(f"{STATE_DIR}/")}
    _no_token(*uploaded.values(), *local.values())

    card = ModelCard(uploaded["README.md"].decode())
    meta = card.data.to_dict()
    assert meta["base_model"] == "org/tiny-llama"
    assert meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers"
    assert {"nvfp4", "modelopt", "fp4", "quantized"} <= set(meta["tags"])
    assert (meta["license"], meta["license_name"], meta["license_link"]) == (
        "other", "tiny-license", "https://example.com/LICENSE")
    for fact in (sha, "vllm serve me/tiny-llama-nvfp4", "--quantization modelopt_fp4", "trtllm-serve",
                 "Blackwell", "Hopper", "lm_head", "nvfp4-convert 0.1.0", "--token ***", "| index |"):
        assert fact in card.text, fact
    creates = [r for r in fake_hub.requests if r.method == "POST" and r.path == "/api/repos/create"]
    assert len(creates) == 1 and creates[0].authorized


def test_cli_convert_push_to_hub_and_push_again(fake_hub, tiny_llama, tmp_path):
    fake_hub.add_repo("org/tiny-llama", tiny_llama)
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["convert", "org/tiny-llama", str(out), "--token", TOKEN, "--endpoint", fake_hub.url,
                                 "--backend", "reference", "--no-progress", "--push-to-hub", "me/pushed",
                                 "--private"])
    assert result.exit_code == 0, result.output
    assert f"pushed to {fake_hub.url}/me/pushed" in result.output
    first = fake_hub.uploaded("me/pushed")

    # A second push re-uses the source license although README.md is now the generated card.
    result = runner.invoke(app, ["push", str(out), "me/pushed", "--token", TOKEN, "--endpoint", fake_hub.url,
                                 "--commit-message", "again"])
    assert result.exit_code == 0, result.output
    again = fake_hub.uploaded("me/pushed")
    assert again == first
    assert ModelCard(again["README.md"].decode()).data.to_dict()["license_name"] == "tiny-license"
    _no_token(result.output, *again.values(), *_files(out).values())


def test_local_source_card_has_no_base_model(fake_hub, tiny_llama, tmp_path):
    out = tmp_path / "out"
    convert(str(tiny_llama), out, backend="reference", progress=False, weight_only=True)
    push(out, "me/local", endpoint=fake_hub.url)
    card = ModelCard(fake_hub.uploaded("me/local")["README.md"].decode())
    assert "base_model" not in card.data.to_dict()
    assert card.data.to_dict()["base_model_relation"] == "quantized"
    assert "W4A16_NVFP4" in card.text and "a local checkpoint" in card.text


def test_push_refuses_a_checkpoint_that_fails_verify(fake_hub, tiny_llama, tmp_path):
    out = tmp_path / "out"
    convert(str(tiny_llama), out, backend="reference", progress=False)
    (out / "hf_quant_config.json").write_text((out / "hf_quant_config.json").read_text().replace('"lm_head",', ""))

    with pytest.raises(ConvertError, match=r"refusing to upload: verify found 2 violation\(s\), first: "):
        push(out, "me/broken", token=TOKEN, endpoint=fake_hub.url)
    result = CliRunner().invoke(app, ["push", str(out), "me/broken", "--token", TOKEN, "--endpoint", fake_hub.url])
    assert result.exit_code == 2 and "error: refusing to upload" in result.output
    _no_token(result.output)
    assert "me/broken" not in fake_hub.repos
    assert not any(r.method == "POST" for r in fake_hub.requests)


def test_push_refuses_an_unfinished_output(fake_hub, tmp_path):
    with pytest.raises(ConvertError, match="not a finished conversion"):
        push(tmp_path, "me/nothing", endpoint=fake_hub.url)
    assert fake_hub.requests == []


def test_card_is_written_once_and_only_after_a_successful_upload(fake_hub, tiny_llama, tmp_path):
    out = tmp_path / "out"
    convert(str(tiny_llama), out, backend="reference", progress=False)
    assert not (out / "README.md").exists()  # the source card describes the BF16 model: not copied
    before = _files(out)
    from huggingface_hub import HfApi
    from huggingface_hub.utils import httpx

    with mock.patch.object(HfApi, "upload_folder", side_effect=httpx.ConnectError("connection dropped")):
        with pytest.raises(ConvertError, match="cannot reach the Hub"):
            push(out, "me/unreachable", endpoint=fake_hub.url)
    assert _files(out) == before
