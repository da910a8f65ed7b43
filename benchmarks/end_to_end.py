"""End-to-end conversion time against the I/O floor, and peak memory, on a synthetic checkpoint.

    python benchmarks/end_to_end.py --size 16GB --dir /tmp/e2e            # Llama-8B-shaped layers
    python benchmarks/end_to_end.py --size 2GB --dir /tmp/e2e --backend cpu
    python benchmarks/end_to_end.py --size 11GB --dir /tmp/e2e --shape dense,moe   # MoE next to dense
    python benchmarks/end_to_end.py --size 4GB --dir /tmp/e2e --shape moe --fp8    # DeepSeek-style FP8 source

Shapes: ``dense`` (Llama-8B layers) and ``moe`` (Qwen3-30B-A3B layers: 128 experts of 768 x 2048,
~390 tensors per layer). With several shapes, each is measured in turn and their conversion rates
compared at the end. ``--fp8`` stores the linear weights as block FP8 (128 x 128 ``weight_scale_inv``)
as DeepSeek and Qwen3-FP8 ship them.

Writes a random BF16 Llama-shaped checkpoint of about SIZE, then in one run measures
  1. the I/O floor: a command that reads every source tensor once and writes tensors of the output's
     sizes once, both with plain safetensors (its own read and write times are reported too);
  2. quantize alone: the backend over every quantized weight, from memory;
  3. `nvfp4-convert SRC OUT` in a child process (wall time and peak RSS);
and prints the ratios. Numbers are for the machine it runs on; run both measurements in one go.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 128256
MOE_HIDDEN, MOE_INTER, MOE_EXPERTS, MOE_VOCAB = 2048, 768, 128, 151936
MOE_HEADS, MOE_KV_HEADS, MOE_HEAD_DIM = 32, 4, 128
FP8_BLOCK = 128


def moe_layer_tensors(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}"
    q, kv = MOE_HEADS * MOE_HEAD_DIM, MOE_KV_HEADS * MOE_HEAD_DIM
    t = {
        f"{p}.self_attn.q_proj.weight": (q, MOE_HIDDEN),
        f"{p}.self_attn.k_proj.weight": (kv, MOE_HIDDEN),
        f"{p}.self_attn.v_proj.weight": (kv, MOE_HIDDEN),
        f"{p}.self_attn.o_proj.weight": (MOE_HIDDEN, q),
        f"{p}.self_attn.q_norm.weight": (MOE_HEAD_DIM,),
        f"{p}.self_attn.k_norm.weight": (MOE_HEAD_DIM,),
        f"{p}.mlp.gate.weight": (MOE_EXPERTS, MOE_HIDDEN),
        f"{p}.input_layernorm.weight": (MOE_HIDDEN,),
        f"{p}.post_attention_layernorm.weight": (MOE_HIDDEN,),
    }
    for e in range(MOE_EXPERTS):
        t.update({f"{p}.mlp.experts.{e}.gate_proj.weight": (MOE_INTER, MOE_HIDDEN),
                  f"{p}.mlp.experts.{e}.up_proj.weight": (MOE_INTER, MOE_HIDDEN),
                  f"{p}.mlp.experts.{e}.down_proj.weight": (MOE_HIDDEN, MOE_INTER)})
    return t


def layer_tensors(i: int) -> dict[str, tuple[int, ...]]:
    head = HIDDEN // HEADS
    p = f"model.layers.{i}"
    return {
        f"{p}.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        f"{p}.self_attn.k_proj.weight": (KV_HEADS * head, HIDDEN),
        f"{p}.self_attn.v_proj.weight": (KV_HEADS * head, HIDDEN),
        f"{p}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        f"{p}.mlp.gate_proj.weight": (INTER, HIDDEN),
        f"{p}.mlp.up_proj.weight": (INTER, HIDDEN),
        f"{p}.mlp.down_proj.weight": (HIDDEN, INTER),
        f"{p}.input_layernorm.weight": (HIDDEN,),
        f"{p}.post_attention_layernorm.weight": (HIDDEN,),
    }


def _fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block FP8 of a 2-D weight: ``scale_inv = block amax / 448`` per 128 x 128 block."""
    rows, cols = t.shape
    pr, pc = -rows % FP8_BLOCK, -cols % FP8_BLOCK
    padded = torch.nn.functional.pad(t.float(), (0, pc, 0, pr))
    blocks = padded.view((rows + pr) // FP8_BLOCK, FP8_BLOCK, (cols + pc) // FP8_BLOCK, FP8_BLOCK)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(rows + pr, cols + pc)[:rows, :cols]
    return q.contiguous(), scale


def make_checkpoint(folder: Path, size: int, *, shard_size: int = 5 * 10**9, vocab: int | None = None,
                    shape: str = "dense", fp8: bool = False) -> int:
    """Random BF16 (or block-FP8) layers of ``shape`` (as many as fit ``size``); returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    moe = shape == "moe"
    hidden, layer = (MOE_HIDDEN, moe_layer_tensors) if moe else (HIDDEN, layer_tensors)
    vocab = vocab or (MOE_VOCAB if moe else VOCAB)
    per_layer = sum((1 if fp8 and len(s) == 2 else 2) * torch.Size(s).numel() for s in layer(0).values())
    layers = max(1, (size - 4 * vocab * hidden) // per_layer)
    names = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        names.update(layer(i))
    names.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers are much faster there
    gen = torch.Generator(device).manual_seed(0)
    shard, shard_bytes, index, total, written = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, written
        if shard:
            written += 1
            name = f"part-{written:05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for name, dims in names.items():
        t = (torch.randn(dims, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        made = {name: t}
        if fp8 and len(dims) == 2 and name.startswith("model.layers.") and ".mlp.gate." not in name:
            made = dict(zip((name, f"{name}_scale_inv"), _fp8(t)))
        nbytes = sum(x.numel() * x.element_size() for x in made.values())
        if shard_bytes + nbytes > shard_size:
            flush()
        shard.update({k: v.cpu() for k, v in made.items()})
        shard_bytes += nbytes
        total += nbytes
    flush()
    final = {}
    n = len(set(index.values()))
    for i, name in enumerate(sorted(set(index.values())), 1):
        new = f"model-{i:05d}-of-{n:05d}.safetensors"
        (folder / name).rename(folder / new)
        final[name] = new
    index = {k: final[v] for k, v in index.items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": index}))
    if moe:
        config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": hidden,
                  "moe_intermediate_size": MOE_INTER, "num_experts": MOE_EXPERTS, "num_experts_per_tok": 8,
                  "num_attention_heads": MOE_HEADS, "num_key_value_heads": MOE_KV_HEADS, "head_dim": MOE_HEAD_DIM}
    else:
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
                  "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS}
    config.update({"num_hidden_layers": layers, "vocab_size": vocab, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5})
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def io_floor(src: Path, scratch: Path) -> tuple[float, float, float]:
    """The I/O floor, as a command of its own (like the conversion): a child process that reads every
    source tensor once and writes tensors of the output's sizes once, with plain safetensors.

    Returns (whole command seconds, read seconds, write seconds)."""
    from nvfp4_convert.converter import convert

    plan = convert(str(src), scratch / "plan", dry_run=True, progress=False, log=lambda _: None).plan
    scratch.mkdir(parents=True, exist_ok=True)
    sizes = scratch / "sizes.json"
    sizes.write_text(json.dumps([{t.name: t.nbytes for t in shard.tensors} for shard in plan.shards]))
    started = time.perf_counter()
    run = subprocess.run([sys.executable, __file__, "--dir", str(scratch), "--floor-child", str(src), str(scratch),
                          str(sizes)],
                         stdout=subprocess.PIPE, text=True, check=True)
    whole = time.perf_counter() - started
    read, write = (float(x) for x in run.stdout.split()[-2:])
    shutil.rmtree(scratch)
    return whole, read, write


def floor_child(src: Path, scratch: Path, sizes: Path) -> None:
    """Child side of :func:`io_floor`: prints the read and write seconds."""
    started = time.perf_counter()
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                f.get_tensor(key).clone()  # safetensors maps lazily: make it really read
    read = time.perf_counter() - started
    started = time.perf_counter()
    for i, shard in enumerate(json.loads(sizes.read_text())):
        tensors = {name: torch.empty(nbytes, dtype=torch.uint8) for name, nbytes in shard.items()}
        save_file(tensors, scratch / f"floor-{i}.safetensors")
        del tensors
    write = time.perf_counter() - started
    print(read, write)


def quantize_only(src: Path, backend_name: str | None) -> tuple[float, str]:
    from nvfp4_convert.fp8 import dequantize
    from nvfp4_convert.kernels import selfcheck
    from nvfp4_convert.kernels.common import global_scale

    backend, _ = selfcheck.select_proven_backend(backend_name)
    spent = 0.0
    scales = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            scales.update({k: f.get_tensor(k) for k in f.keys() if k.endswith("_scale_inv")})
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                if key.endswith("proj.weight"):
                    w = f.get_tensor(key)
                    if w.dtype == torch.float8_e4m3fn:  # dequantized outside the timing
                        w = dequantize(w, scales[f"{key}_scale_inv"], (FP8_BLOCK, FP8_BLOCK))
                    started = time.perf_counter()
                    backend.quantize(w, global_scale(backend.amax(w)))
                    spent += time.perf_counter() - started
    return spent, backend.name


def main() -> None:
    from nvfp4_convert.converter import parse_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2GB")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--shape", default="dense", help="dense, moe, or both: dense,moe")
    parser.add_argument("--fp8", action="store_true", help="block-FP8 source (DeepSeek style)")
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and output")
    parser.add_argument("--floor-child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_child:
        return floor_child(*args.floor_child)
    rates = {}
    for shape in args.shape.split(","):
        print(f"== {shape}{' (FP8 source)' if args.fp8 else ''}")
        folder = args.dir / shape
        rates[shape] = measure(folder, size=parse_size(args.size), shape=shape, fp8=args.fp8, vocab=args.vocab,
                               backend=args.backend)
        if not args.keep:
            shutil.rmtree(folder)
    if len(rates) > 1:
        (a, (ca, ia)), (b, (cb, ib)) = list(rates.items())[:2]
        print(f"{b} vs {a}: whole command {cb / ca:.0%} of the GB/s ({cb:.2f} vs {ca:.2f}), convert() alone "
              f"{ib / ia:.0%} ({ib:.2f} vs {ia:.2f} GB/s)")


def measure(folder: Path, *, size: int, shape: str, fp8: bool, vocab: int | None,
            backend: str | None) -> tuple[float, float]:
    """Measure one synthetic checkpoint; returns (whole-command GB/s, convert()-alone GB/s)."""
    from nvfp4_convert.safetensors_io import read_header

    src, out = folder / "src", folder / "out"
    shutil.rmtree(out, ignore_errors=True)
    if not (src / "config.json").exists():
        started = time.perf_counter()
        total = make_checkpoint(src, size, vocab=vocab, shape=shape, fp8=fp8)
        count = sum(len(read_header(p).tensors) for p in src.glob("*.safetensors"))
        print(f"wrote synthetic checkpoint: {total / 1e9:.2f} GB, {count} tensors in "
              f"{time.perf_counter() - started:.1f} s")
    total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    # Flush pending writes before each measurement, so that neither pays for the other's write-back.
    os.sync()
    floor_cmd, read, write = io_floor(src, folder / "floor")
    os.sync()
    q, backend_name = quantize_only(src, backend)
    # The child reports its own peak RSS (VmHWM): ru_maxrss would include this process's memory at fork.
    child = ("import re, sys\nfrom nvfp4_convert.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
             "    hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
             "    print('PEAK_RSS_KB', hwm, file=sys.stderr)\n")
    cmd = [sys.executable, "-c", child, str(src), str(out), "--no-progress"]
    if backend:
        cmd += ["--backend", backend]
    os.sync()
    started = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    convert_s = time.perf_counter() - started
    if run.returncode:
        sys.exit(run.stderr)
    print(run.stdout, end="")
    inside = float(re.search(r"done in ([0-9.]+) s", run.stdout).group(1))  # convert() itself
    peak = int(run.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) * 1024
    largest = max(t.nbytes for p in src.glob("*.safetensors") for t in read_header(p).tensors.values())
    floor = read + write
    print(f"source {total / 1e9:.2f} GB, largest tensor T = {largest / 1e6:.0f} MB, backend {backend_name}")
    print(f"I/O floor: read {read:.2f} s + write {write:.2f} s = {floor:.2f} s; as a command (with interpreter "
          f"start-up and imports) {floor_cmd:.2f} s; quantize alone {q:.2f} s")
    print(f"convert, whole command: {convert_s:.2f} s = {convert_s / floor_cmd:.2f}x the floor command "
          f"({convert_s / floor:.2f}x the floor's own I/O time); {total / convert_s / 1e9:.2f} GB/s")
    print(f"convert() alone (without its {convert_s - inside:.2f} s of start-up and imports): {inside:.2f} s = "
          f"{inside / floor:.2f}x the floor's I/O time, {inside / max(floor, q):.2f}x max(I/O floor, quantize); "
          f"{total / inside / 1e9:.2f} GB/s")
    print(f"peak RSS of the conversion: {peak / 1e9:.2f} GB (bound 3T + 1.5 GB = {(3 * largest + 1.5e9) / 1e9:.2f} GB)")
    shutil.rmtree(out, ignore_errors=True)
    return total / convert_s / 1e9, total / inside / 1e9


if __name__ == "__main__":
    main()
