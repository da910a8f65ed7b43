"""Shared fixtures: an isolated Hugging Face home for every test and a loopback fake Hub."""

from __future__ import annotations

import pytest

from fakehub import FakeHub


@pytest.fixture(autouse=True)
def isolated_hf_home(tmp_path_factory, monkeypatch):
    """Point every Hugging Face cache and token path at a fresh temp folder, with no token set.

    ``huggingface_hub.constants`` reads these at import, so both the environment and the module
    values are patched. Xet and telemetry are off so downloads go through plain HTTP.
    """
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("hf_home")
    paths = {
        "HF_HOME": home,
        "HF_HUB_CACHE": home / "hub",
        "HF_ASSETS_CACHE": home / "assets",
        "HF_XET_CACHE": home / "xet",
        "HF_TOKEN_PATH": home / "token",
    }
    for name, path in paths.items():
        monkeypatch.setenv(name, str(path))
        monkeypatch.setattr(constants, name, str(path))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(constants, name, True)
    return home


@pytest.fixture
def fake_hub():
    """A fake Hub on 127.0.0.1 (see ``tests/fakehub.py``); pass ``endpoint=fake_hub.url``."""
    hub = FakeHub()
    yield hub
    hub.close()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``tiny(kind, **options)``: a cached tiny random checkpoint folder (see ``tests/tiny_models.py``)."""
    from tiny_models import build_tiny

    cache: dict = {}
    root = tmp_path_factory.mktemp("tiny")

    def make(kind: str, **options):
        key = (kind, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = build_tiny(kind, root / f"{kind}-{len(cache)}", **options)
        return cache[key]

    return make
