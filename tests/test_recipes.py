"""Recipes are data: picked by model_type, extended, overridden, and refused with one line when malformed."""

from __future__ import annotations

import pytest

from nvfp4_convert import ConvertError
from nvfp4_convert.recipes import load_recipe


def test_model_type_picks_the_recipe_and_extends_default():
    llama = load_recipe(config={"model_type": "llama"})
    assert llama.name == "llama" and "lm_head" in llama.exclude  # inherited from default
    assert load_recipe(config={"model_type": "mistral"}).name == "mistral"
    assert load_recipe(config={"model_type": "no-such-family"}).name == "default"
    assert any(set(r.members) == {"q_proj", "k_proj", "v_proj"} for r in llama.fuse)


def test_user_excludes_are_kept_apart_and_named():
    recipe = load_recipe(config={"model_type": "llama"}, extra_excludes=["*self_attn*"])
    assert recipe.exclusion("model.layers.0.self_attn.q_proj") == "--exclude '*self_attn*'"
    default = load_recipe(config={"model_type": "no-such-family"})
    assert default.exclusion("model.layers.0.input_layernorm") == "excluded by recipe default ('*norm*')"
    assert recipe.exclusion("lm_head").startswith("not matched by recipe llama")
    assert recipe.exclusion("model.layers.0.mlp.down_proj") is None
    assert "*self_attn*" in recipe.summary()["exclude"]  # fingerprints and model cards see every exclusion


def test_recipe_file_replaces_the_choice(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\nextends = "default"\nexclude = ["*down_proj"]\n')
    recipe = load_recipe(config={"model_type": "llama"}, recipe_file=path)
    assert recipe.name == "mine" and recipe.exclusion("model.layers.3.mlp.down_proj") == \
        "excluded by recipe mine ('*down_proj')"


@pytest.mark.parametrize("text,match", [
    ("name = 'x'\nbogus = 1\n", "unknown recipe keys"),
    ("name = 'x'\nexclude = 'lm_head'\n", "must be a list of strings"),
    ("name = 'x'\n[[fuse]]\nmembers = ['q_proj']\n", "two or more"),
    ("name = [\n", "invalid recipe"),
    ("name = 'x'\nexclude = ['layers.{missing}']\n", "needs config value"),
])
def test_malformed_recipes_are_one_line(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConvertError, match=match):
        load_recipe(config={"model_type": "llama"}, recipe_file=path)
