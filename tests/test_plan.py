"""Planning from headers alone: who keeps what, fused groups, shard layout, and the plan table."""

from __future__ import annotations

import math

import pytest

from nvfp4_convert.plan import build_plan
from nvfp4_convert.recipes import load_recipe
from nvfp4_convert.report import plan_rows, size_line
from nvfp4_convert.safetensors_io import DTYPE_SIZES, ShardHeader, TensorInfo

CONFIG = {"model_type": "llama", "num_hidden_layers": 3}


def _layer(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}"
    return {f"{p}.self_attn.q_proj.weight": (64, 64), f"{p}.self_attn.k_proj.weight": (32, 64),
            f"{p}.self_attn.v_proj.weight": (32, 64), f"{p}.self_attn.o_proj.weight": (64, 64),
            f"{p}.mlp.gate_proj.weight": (128, 64), f"{p}.mlp.up_proj.weight": (128, 64),
            f"{p}.mlp.down_proj.weight": (64, 128), f"{p}.input_layernorm.weight": (64,)}


def _headers(names: dict[str, tuple[int, ...]], shards: int = 2) -> dict[str, ShardHeader]:
    """Headers of ``shards`` BF16 shards holding ``names`` round-robin (no data needed to plan)."""
    per: list[dict[str, TensorInfo]] = [{} for _ in range(shards)]
    cursors = [0] * shards
    for i, (name, shape) in enumerate(names.items()):
        s, n = i % shards, math.prod(shape) * DTYPE_SIZES["BF16"]
        per[s][name] = TensorInfo(name, "BF16", shape, (cursors[s], cursors[s] + n))
        cursors[s] += n
    return {f"model-{s + 1:05d}-of-{shards:05d}.safetensors":
            ShardHeader(f"model-{s + 1:05d}-of-{shards:05d}.safetensors", per[s], {}, 8, 8 + cursors[s])
            for s in range(shards)}


def _plan(extra_excludes=(), **options):
    names = {"model.embed_tokens.weight": (256, 64), **_layer(0), **_layer(1), **_layer(2),
             "model.norm.weight": (64,), "lm_head.weight": (256, 64)}
    recipe = load_recipe(config=CONFIG, extra_excludes=list(extra_excludes))
    return build_plan(config=CONFIG, headers=_headers(names), weight_map=None, recipe=recipe, **options)


def test_fused_groups_share_one_unit_across_shards():
    plan = _plan()
    groups = {frozenset(g) for g in plan.groups if len(g) > 1}
    assert len(groups) == 6
    assert {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
            "model.layers.1.self_attn.v_proj"} in groups
    assert {"model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj"} in groups
    shards = {plan.tensors[f"{m}.weight"].shard for m in ("model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj")}
    assert len(shards) == 2  # the group straddles two source shards, and is still one unit
    units = [u for s in plan.shards for u in s.units if "model.layers.2.mlp.up_proj" in u.modules]
    assert len(units) == 1 and set(units[0].modules) == {"model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj"}
    assert len(plan.quantized) == 3 * 7 and "lm_head" not in plan.quantized


def test_kept_reasons_say_who_kept_what():
    plan = _plan(extra_excludes=["model.layers.1.mlp.down_proj"])
    assert plan.kept_reasons["model.layers.1.mlp.down_proj"] == "--exclude 'model.layers.1.mlp.down_proj'"
    assert "quantize patterns" in plan.kept_reasons["lm_head"]
    assert "model.layers.0.mlp.down_proj" in plan.quantized


def test_shards_stay_under_the_limit_and_cover_every_tensor():
    plan = _plan(max_shard_size=40_000)
    assert len(plan.shards) > 1
    for shard in plan.shards:
        assert shard.nbytes <= 40_000 or len(shard.units) == 1
    written = [t.name for s in plan.shards for t in s.tensors]
    assert len(written) == len(set(written))
    assert {n for n in written if not n.endswith(("_scale", "_scale_2"))} == set(plan.tensors)


def test_weight_only_has_no_input_scale():
    names = [t.name for s in _plan(weight_only=True).shards for t in s.tensors]
    assert not any(n.endswith(".input_scale") for n in names) and any(n.endswith(".weight_scale_2") for n in names)


def test_rows_keep_a_per_layer_exclusion_apart_and_come_in_layer_order():
    rows = plan_rows(_plan(extra_excludes=["model.layers.1.mlp.down_proj"]))
    labels = [r[0] for r in rows]
    down = {r[0]: (r[1], r[3]) for r in rows if "down_proj" in r[0]}
    assert down == {"model.layers.[0,2].mlp.down_proj.weight": (2, "NVFP4"),
                    "model.layers.1.mlp.down_proj.weight": (1, "keep: --exclude 'model.layers.1.mlp.down_proj'")}
    assert labels.index("model.layers.*.self_attn.q_proj.weight") < labels.index("model.layers.1.mlp.down_proj.weight")
    assert labels.index("model.embed_tokens.weight") < labels.index("model.layers.*.input_layernorm.weight")
    assert labels[-1] == "model.norm.weight"


@pytest.mark.parametrize("bytes_in,bytes_out,text", [
    (2_000_000, 1_000_000, "2.00 MB -> 1.00 MB (2.00x smaller)"),
    (16 * 10**9, 4_500_000_000, "16.00 GB -> 4.50 GB (3.56x smaller)"),
])
def test_one_size_wording(bytes_in, bytes_out, text):
    assert size_line(bytes_in, bytes_out) == text
    assert size_line(bytes_in, bytes_out, about=True) == text.replace("-> ", "-> about ")
