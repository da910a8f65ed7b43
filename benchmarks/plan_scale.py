"""Planning and structural verification at DeepSeek-V3 scale, on headers alone.

    python benchmarks/plan_scale.py --dir /tmp/plan-scale           # FP8 block-quantized source (as published)
    python benchmarks/plan_scale.py --dir /tmp/plan-scale --bf16    # the same shapes in BF16

Writes a DeepSeek-V3-shaped checkpoint (61 decoder layers + the multi-token-prediction layer, 256
routed experts, ~92k tensors in 163 shards) as sparse files: real safetensors headers, data left as
holes, so it takes a few MB of disk. Then times

  1. reading every shard header,
  2. ``build_plan`` (classification, fusion groups, exclusions, output layout),
  3. structural ``verify`` of an output laid out by that plan (again sparse; scalars written as 1.0):
     every check except the per-byte code and block-scale scans, whose cost follows the bytes of
     data rather than the number of tensors.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import time
from pathlib import Path

from nvfp4_convert.safetensors_io import OutTensor, layout

HIDDEN, INTER, MOE_INTER, EXPERTS, LAYERS, DENSE, VOCAB = 7168, 18432, 2048, 256, 61, 3, 129280
Q_LORA, KV_LORA, HEADS, NOPE, ROPE, V_HEAD = 1536, 512, 128, 128, 64, 128
FP8_BLOCK = 128


def layer_weights(i: int) -> dict[str, tuple[int, ...]]:
    """Weights (2-D) and vectors (1-D) of decoder layer ``i``."""
    p = f"model.layers.{i}"
    t = {
        f"{p}.input_layernorm.weight": (HIDDEN,),
        f"{p}.post_attention_layernorm.weight": (HIDDEN,),
        f"{p}.self_attn.q_a_proj.weight": (Q_LORA, HIDDEN),
        f"{p}.self_attn.q_a_layernorm.weight": (Q_LORA,),
        f"{p}.self_attn.q_b_proj.weight": (HEADS * (NOPE + ROPE), Q_LORA),
        f"{p}.self_attn.kv_a_proj_with_mqa.weight": (KV_LORA + ROPE, HIDDEN),
        f"{p}.self_attn.kv_a_layernorm.weight": (KV_LORA,),
        f"{p}.self_attn.kv_b_proj.weight": (HEADS * (NOPE + V_HEAD), KV_LORA),
        f"{p}.self_attn.o_proj.weight": (HIDDEN, HEADS * V_HEAD),
    }
    if i < DENSE:
        t.update({f"{p}.mlp.gate_proj.weight": (INTER, HIDDEN), f"{p}.mlp.up_proj.weight": (INTER, HIDDEN),
                  f"{p}.mlp.down_proj.weight": (HIDDEN, INTER)})
        return t
    t[f"{p}.mlp.gate.weight"] = (EXPERTS, HIDDEN)
    t[f"{p}.mlp.gate.e_score_correction_bias"] = (EXPERTS,)
    for e in [*range(EXPERTS), None]:
        q = f"{p}.mlp.experts.{e}" if e is not None else f"{p}.mlp.shared_experts"
        t.update({f"{q}.gate_proj.weight": (MOE_INTER, HIDDEN), f"{q}.up_proj.weight": (MOE_INTER, HIDDEN),
                  f"{q}.down_proj.weight": (HIDDEN, MOE_INTER)})
    return t


def checkpoint_tensors(*, fp8: bool) -> list[OutTensor]:
    """Every tensor of the checkpoint, in save order (DeepSeek's own FP8 layout when ``fp8``)."""
    names: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS + 1):
        names.update(layer_weights(i))
    mtp = f"model.layers.{LAYERS}"
    names.update({f"{mtp}.embed_tokens.weight": (VOCAB, HIDDEN), f"{mtp}.enorm.weight": (HIDDEN,),
                  f"{mtp}.hnorm.weight": (HIDDEN,), f"{mtp}.eh_proj.weight": (HIDDEN, 2 * HIDDEN),
                  f"{mtp}.shared_head.norm.weight": (HIDDEN,), f"{mtp}.shared_head.head.weight": (VOCAB, HIDDEN),
                  "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    out = []
    for name, shape in names.items():
        high_precision = len(shape) == 1 or any(k in name for k in ("embed_tokens", "mlp.gate.", "head", "eh_proj"))
        if fp8 and not high_precision:
            out.append(OutTensor(name, "F8_E4M3", shape))
            blocks = tuple(math.ceil(d / FP8_BLOCK) for d in shape)
            out.append(OutTensor(f"{name}_scale_inv", "F32", blocks))
        else:
            out.append(OutTensor(name, "F32" if name.endswith("bias") else "BF16", shape))
    return out


def write_sparse(path: Path, tensors: list[OutTensor], scalars: float | None = None) -> None:
    """A safetensors file with a real header and holes for data (0-dim F32 tensors set to ``scalars``)."""
    head, offsets = layout(tensors)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(t.nbytes for t in tensors))
        if scalars is not None:
            for t in tensors:
                if t.dtype == "F32" and t.shape == ():
                    f.seek(offsets[t.name])
                    f.write(struct.pack("<f", scalars))


def make_source(folder: Path, *, fp8: bool, shards: int = 163) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(fp8=fp8)
    per_shard = sum(t.nbytes for t in tensors) / shards
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(t)
        size += t.nbytes
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):06d}.safetensors"
        write_sparse(folder / name, group)
        weight_map.update({t.name: name for t in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "moe_intermediate_size": MOE_INTER, "n_routed_experts": EXPERTS,
              "n_shared_experts": 1, "num_hidden_layers": LAYERS, "first_k_dense_replace": DENSE,
              "num_nextn_predict_layers": 1, "q_lora_rank": Q_LORA, "kv_lora_rank": KV_LORA,
              "num_attention_heads": HEADS, "vocab_size": VOCAB, "torch_dtype": "bfloat16"}
    if fp8:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return len(tensors)


def main() -> None:
    from nvfp4_convert.converter import _write_final_files
    from nvfp4_convert.plan import build_plan
    from nvfp4_convert.recipes import load_recipe
    from nvfp4_convert.sources.local import LocalSource
    from nvfp4_convert.verify import checks, verify

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--bf16", action="store_true", help="BF16 source instead of DeepSeek's block FP8")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    src, out = args.dir / "src", args.dir / "out"
    started = time.perf_counter()
    count = make_source(src, fp8=not args.bf16)
    print(f"sparse source: {count} tensors in {len(list(src.glob('*.safetensors')))} shards, "
          f"written in {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    source = LocalSource(src)
    headers = source.headers()
    read_s = time.perf_counter() - started
    config = json.loads((src / "config.json").read_text())
    recipe = load_recipe(config=config)
    started = time.perf_counter()
    plan = build_plan(config=config, headers=headers, weight_map=source.weight_map, recipe=recipe)
    plan_s = time.perf_counter() - started
    out_tensors = sum(len(s.tensors) for s in plan.shards)
    print(f"read headers: {read_s:.2f} s; build_plan: {plan_s:.2f} s ({len(plan.quantized)} quantized modules, "
          f"{out_tensors} output tensors in {len(plan.shards)} shards, {len(plan.exclude_modules)} exclusions)")

    out.mkdir(parents=True)
    for shard in plan.shards:
        write_sparse(out / shard.filename, shard.tensors, scalars=1.0)
    _write_final_files(config, plan, out)
    checker = checks.OutputChecker
    scans = checker._scan_codes, checker._scan_block_scales
    checker._scan_codes = checker._scan_block_scales = lambda *a, **k: None
    try:
        started = time.perf_counter()
        report = verify(out, progress=False)
        verify_s = time.perf_counter() - started
    finally:
        checker._scan_codes, checker._scan_block_scales = scans
    print(f"structural verify (without the per-byte scans): {verify_s:.2f} s, {len(report.violations)} violations")
    print(f"goal: plan < 3 s ({'met' if plan_s < 3 else 'NOT met'}), structural verify < 10 s "
          f"({'met' if verify_s < 10 else 'NOT met'})")
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
