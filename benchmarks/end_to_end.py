"""End-to-end conversion time against the I/O floor, and peak memory, on a synthetic checkpoint.

    python benchmarks/end_to_end.py --size 16GB --dir /tmp/e2e            # Llama-8B-shaped layers
    python benchmarks/end_to_end.py --size 2GB --dir /tmp/e2e --backend cpu

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


def layer_tensors(i: int) -> dict[str, tuple[int, int]]:
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


def make_checkpoint(folder: Path, size: int, *, shard_size: int = 5 * 10**9, vocab: int = VOCAB) -> int:
    """Random BF16 Llama-8B-shaped layers (as many as fit ``size``); returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    per_layer = sum(2 * torch.Size(s).numel() for s in layer_tensors(0).values())
    layers = max(1, (size - 4 * vocab * HIDDEN) // per_layer)
    names = {"model.embed_tokens.weight": (vocab, HIDDEN)}
    for i in range(layers):
        names.update(layer_tensors(i))
    names.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (vocab, HIDDEN)})
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

    for name, shape in names.items():
        t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
        if shard_bytes + t.numel() * 2 > shard_size:
            flush()
        shard[name] = t
        shard_bytes += t.numel() * 2
        total += t.numel() * 2
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
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "num_hidden_layers": layers, "vocab_size": vocab, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}
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
    from nvfp4_convert.kernels import selfcheck
    from nvfp4_convert.kernels.common import global_scale

    backend, _ = selfcheck.select_proven_backend(backend_name)
    spent = 0.0
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                if "proj" in key:
                    w = f.get_tensor(key)
                    started = time.perf_counter()
                    backend.quantize(w, global_scale(backend.amax(w)))
                    spent += time.perf_counter() - started
    return spent, backend.name


def main() -> None:
    from nvfp4_convert.converter import parse_size
    from nvfp4_convert.safetensors_io import read_header

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2GB")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and output")
    parser.add_argument("--floor-child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_child:
        return floor_child(*args.floor_child)
    src, out = args.dir / "src", args.dir / "out"
    shutil.rmtree(out, ignore_errors=True)
    if not (src / "config.json").exists():
        started = time.perf_counter()
        total = make_checkpoint(src, parse_size(args.size), vocab=args.vocab)
        print(f"wrote synthetic checkpoint: {total / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s")
    total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    # Flush pending writes before each measurement, so that neither pays for the other's write-back.
    os.sync()
    floor_cmd, read, write = io_floor(src, args.dir / "floor")
    os.sync()
    q, backend = quantize_only(src, args.backend)
    # The child reports its own peak RSS (VmHWM): ru_maxrss would include this process's memory at fork.
    child = ("import re, sys\nfrom nvfp4_convert.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
             "    hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
             "    print('PEAK_RSS_KB', hwm, file=sys.stderr)\n")
    cmd = [sys.executable, "-c", child, str(src), str(out), "--no-progress"]
    if args.backend:
        cmd += ["--backend", args.backend]
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
    print(f"source {total / 1e9:.2f} GB, largest tensor T = {largest / 1e6:.0f} MB, backend {backend}")
    print(f"I/O floor: read {read:.2f} s + write {write:.2f} s = {floor:.2f} s; as a command (with interpreter "
          f"start-up and imports) {floor_cmd:.2f} s; quantize alone {q:.2f} s")
    print(f"convert, whole command: {convert_s:.2f} s = {convert_s / floor_cmd:.2f}x the floor command "
          f"({convert_s / floor:.2f}x the floor's own I/O time); {total / convert_s / 1e9:.2f} GB/s")
    print(f"convert() alone (without its {convert_s - inside:.2f} s of start-up and imports): {inside:.2f} s = "
          f"{inside / floor:.2f}x the floor's I/O time, {inside / max(floor, q):.2f}x max(I/O floor, quantize)")
    print(f"peak RSS of the conversion: {peak / 1e9:.2f} GB (bound 3T + 1.5 GB = {(3 * largest + 1.5e9) / 1e9:.2f} GB)")
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
