"""A config field of the wrong JSON type is one line naming the field and file, exit 2, wherever it is read."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from checks import assert_one_line_error
from nvfp4_convert.cli import app
from nvfp4_convert.config_fields import INFO_FIELDS, KINDS, MODEL_FIELDS, field_errors
from nvfp4_convert.output import STATE_DIR, read_conversion_info

runner = CliRunner()
CANDIDATES = ["x", 5, -3, 1.5, True, None, [1], {}, ["a", 1], [0, 16], [128, 128]]


def wrong_values(kind: str) -> list:
    """Up to four JSON values a field of ``kind`` must refuse."""
    check = KINDS[kind][1]
    return [v for v in CANDIDATES if not check(v)][:4]


CASES = [pytest.param(name, value, id=f"{name}={json.dumps(value)}")
         for name, kind in MODEL_FIELDS.items() for value in wrong_values(kind)]


def with_field(config: dict, name: str, value) -> dict:
    config = json.loads(json.dumps(config))
    *parents, leaf = name.split(".")
    holder = config
    for key in parents:
        if not isinstance(holder.get(key), dict):
            holder[key] = {}
        holder = holder[key]
    holder[leaf] = value
    return config


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("typed") / "out"
    result = runner.invoke(app, ["convert", str(tiny("llama")), str(out), "--no-progress", "--backend", "reference"])
    assert result.exit_code == 0, result.output
    return out


def source_with(tiny, tmp_path, name, value):
    src = shutil.copytree(tiny("llama"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(with_field(config, name, value)))
    return src


def test_every_kind_has_wrong_values():
    assert all(len(wrong_values(kind)) >= 2 for kind in KINDS)


@pytest.mark.parametrize(("name", "value"), CASES)
def test_wrong_type_in_source_config(tiny, tmp_path, name, value):
    src = source_with(tiny, tmp_path, name, value)
    for extra in (["--dry-run"], ["--backend", "reference"]):
        out = tmp_path / "out"
        result = runner.invoke(app, ["convert", str(src), str(out), "--no-progress", *extra])
        assert_one_line_error(result, f"field {name!r}", f"{src}/config.json")
        assert not (out / "config.json").exists()


@pytest.mark.parametrize(("name", "value"), [c for c in CASES if c.values[1] in ("x", [1])])
def test_wrong_type_in_verify_source(tiny, tmp_path, converted, name, value):
    src = source_with(tiny, tmp_path, name, value)
    result = runner.invoke(app, ["verify", str(converted), "--source", str(src), "--no-progress"])
    assert_one_line_error(result, f"field {name!r}", "config.json")


@pytest.mark.parametrize(("name", "value"), [c for c in CASES if c.values[1] in ("x", [1])])
def test_wrong_type_in_output_config_is_a_violation(tmp_path, converted, name, value):
    """verify judges OUT: a mistyped field there is a finding naming it (exit 1), never a crash."""
    out = shutil.copytree(converted, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(with_field(config, name, value)))
    result = runner.invoke(app, ["verify", str(out), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and not result.stderr.strip()
    assert f"field {name!r}" in result.stdout


@pytest.mark.parametrize("producer", ["modelopt", [1], {"name": 5}])
def test_wrong_type_in_output_hf_quant_config(tmp_path, converted, producer):
    out = shutil.copytree(converted, tmp_path / "out")
    doc = json.loads((out / "hf_quant_config.json").read_text())
    (out / "hf_quant_config.json").write_text(json.dumps({**doc, "producer": producer}))
    result = runner.invoke(app, ["verify", str(out), "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "hf_quant_config.json field 'producer" in result.stdout


@pytest.mark.parametrize("metadata", [[1], "x"])
def test_wrong_type_in_output_index(tmp_path, converted, metadata):
    out = shutil.copytree(converted, tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    (out / "model.safetensors.index.json").write_text(json.dumps({**index, "metadata": metadata}))
    result = runner.invoke(app, ["verify", str(out), "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "not valid JSON with a weight_map" in result.stdout


@pytest.mark.parametrize("value", [None, [1], {"a": 1}, True, 1.5])
def test_recipe_placeholder_needs_an_integer_or_string(tiny, tmp_path, value):
    src = source_with(tiny, tmp_path, "rope_theta", value)
    recipe = tmp_path / "r.toml"
    recipe.write_text("name = 'r'\nquantize = ['*proj']\nexclude = ['model.layers.{rope_theta}.*']\n")
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "out"), "--dry-run", "--recipe", str(recipe)])
    assert_one_line_error(result, "'rope_theta'", "an integer or string", str(recipe))


@pytest.mark.parametrize("pattern", ["model.{num_hidden_layers.real}", "model.{0}", "model.{", "model.{}"])
def test_recipe_placeholder_is_a_plain_key(tiny, tmp_path, pattern):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"name = 'r'\nquantize = ['*proj']\nexclude = [{json.dumps(pattern)}]\n")
    result = runner.invoke(app, ["convert", str(tiny("llama")), str(tmp_path / "out"), "--dry-run",
                                 "--recipe", str(recipe)])
    assert_one_line_error(result, "recipe pattern", str(recipe))


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, k in INFO_FIELDS.items() for v in wrong_values(k)[:2]])
def test_damaged_conversion_record_is_not_a_finished_conversion(tmp_path, converted, name, value):
    """A model card is only made from a record whose every field has its type."""
    out = shutil.copytree(converted, tmp_path / "out")
    state_path = out / STATE_DIR / "state.json"
    state = json.loads(state_path.read_text())
    assert read_conversion_info(out) is not None
    state["info"] = with_field(state["info"], name, value)
    state_path.write_text(json.dumps(state))
    assert read_conversion_info(out) is None
    result = runner.invoke(app, ["push", str(out), "me/x"])
    assert_one_line_error(result, "not a finished conversion")


def test_the_tiny_models_config_is_well_typed(tiny):
    for kind in ("llama", "deepseek_v3", "qwen2_5_vl", "gemma3"):
        assert field_errors(json.loads((tiny(kind) / "config.json").read_text()), MODEL_FIELDS) == []
