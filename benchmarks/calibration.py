"""Calibration time and memory on a model of a given shape, with random weights and random token ids.

Writes a random checkpoint of the shape (one shard per decoder layer; every layer holds the same random
values, which does not change the work), then collects the activation statistics for ``--samples`` x
``--seq-len`` tokens one decoder layer at a time, and prints the time, the peak GPU memory, the peak
resident memory of the process, and the memory the design predicts (one layer + hidden states).

With ``--weight-step`` it measures instead what calibration adds to the quantization itself: the statistics
are collected once (timed, reported apart), then the same checkpoint is converted with data-free
round-to-nearest block scales, with the unweighted search and with block scales searched under the calibrated
E[x^2] channel weights
(``--scales mse-weighted`` with those weights given, so no forward pass is timed), each ``--repeat`` times
(best time kept, the backend self-check excluded), and the ratio is printed.

Examples::

    python benchmarks/calibration.py                                   # Llama-3.1-8B shape, 512 x 2048
    python benchmarks/calibration.py --shape tiny --samples 8 --seq-len 64 --device cpu    # dry run
    python benchmarks/calibration.py --shape medium --samples 8 --seq-len 128 --device cpu --weight-step
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 128256},
    "medium": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 4, "num_attention_heads": 8,
               "num_key_value_heads": 4, "vocab_size": 4096},
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1024},
}


def write_model(folder: Path, shape: dict, layers: int | None = None) -> Path:
    """A random Llama checkpoint of ``shape`` in BF16, one shard per decoder layer."""
    from safetensors.torch import save_file

    n = layers or shape["num_hidden_layers"]
    h, i, heads, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"], \
        shape["num_key_value_heads"]
    d = h // heads
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers are quicker made on a GPU
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*s):
        return (torch.randn(*s, generator=gen, device=device) * s[-1] ** -0.5).to(torch.bfloat16).cpu()

    layer = {"self_attn.q_proj.weight": rand(h, h), "self_attn.k_proj.weight": rand(kv * d, h),
             "self_attn.v_proj.weight": rand(kv * d, h), "self_attn.o_proj.weight": rand(h, h),
             "mlp.gate_proj.weight": rand(i, h), "mlp.up_proj.weight": rand(i, h), "mlp.down_proj.weight": rand(h, i),
             "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
             "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    total = n + 1
    for k in range(n):
        name = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
        save_file({f"model.layers.{k}.{key}": t for key, t in layer.items()}, folder / name, metadata={"format": "pt"})
        weight_map.update({f"model.layers.{k}.{key}": name for key in layer})
    name = f"model-{total:05d}-of-{total:05d}.safetensors"
    rest = {"model.embed_tokens.weight": rand(shape["vocab_size"], h),
            "model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rand(shape["vocab_size"], h)}
    save_file(rest, folder / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
              "tie_word_embeddings": False, "hidden_act": "silu", **shape, "num_hidden_layers": n}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _setup(folder: Path, *, samples: int, seq_len: int):
    """The checkpoint's source, config, plan and ``samples`` rows of random token ids."""
    from nvfp4_convert.calibration.data import CalibrationData
    from nvfp4_convert.plan import build_plan
    from nvfp4_convert.recipes import load_recipe
    from nvfp4_convert.sources import open_source

    source = open_source(str(folder))
    config = source.read_json("config.json")
    plan = build_plan(config=config, headers=source.headers(), weight_map=source.weight_map,
                      recipe=load_recipe(config=config))
    ids = torch.randint(0, config["vocab_size"], (samples, seq_len), generator=torch.Generator().manual_seed(1))
    return source, config, plan, CalibrationData(ids, dataset="random token ids", column=None, split=None)


def run(folder: Path, *, samples: int, seq_len: int, device: str, batch_tokens: int) -> dict:
    from nvfp4_convert.calibration.collect import collect_statistics

    source, config, plan, data = _setup(folder, samples=samples, seq_len=seq_len)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    stats = collect_statistics(source=source, plan=plan, config=config, data=data, device=device,
                               progress=True, batch_tokens=batch_tokens)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    layer_bytes = max(sum(plan.tensors[n].info.nbytes for n in plan.tensors if n.startswith(f"model.layers.{k}."))
                      for k in range(config["num_hidden_layers"]))
    h = config["hidden_size"]
    return {
        "seconds": seconds,
        "tokens": samples * seq_len,
        "tokens_per_second": samples * seq_len / seconds,
        "linears": len(stats),
        "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "predicted": {"hidden_states_gib": samples * seq_len * h * 2 / 2**30, "layer_gib": layer_bytes / 2**30,
                      "embedding_gib": config["vocab_size"] * h * 2 / 2**30,
                      "batch_mlp_temporaries_gib": batch_tokens * config["intermediate_size"] * 2 * 3 / 2**30},
    }


def weight_step(folder: Path, out: Path, *, samples: int, seq_len: int, device: str, batch_tokens: int,
                repeat: int, backend: str | None) -> dict:
    """Conversion time with round-to-nearest block scales against the E[x^2]-weighted search (statistics given)."""
    from nvfp4_convert import convert
    from nvfp4_convert.calibration.collect import collect_statistics
    from nvfp4_convert.importance import FixedChannelWeights

    source, config, plan, data = _setup(folder, samples=samples, seq_len=seq_len)
    start = time.perf_counter()
    stats = collect_statistics(source=source, plan=plan, config=config, data=data, device=device, progress=False,
                               batch_tokens=batch_tokens)
    forward = time.perf_counter() - start
    weights = FixedChannelWeights({m: s.second_moment for m, s in stats.items() if s.tokens})
    runs: dict[str, list[float]] = {"rtn": [], "mse": [], "mse-weighted": []}
    chosen = {}
    for k in range(repeat):
        for scales in runs:
            target = out / f"{scales}-{k}"  # a fresh folder: a finished one would be resumed, i.e. skipped
            start = time.perf_counter()
            report = convert(str(folder), target, scales=scales, backend=backend, progress=False,
                             channel_weights=weights if scales == "mse-weighted" else None, log=lambda _: None)
            runs[scales].append(time.perf_counter() - start - report.check_seconds)
            chosen[scales] = report.backend
            shutil.rmtree(target)
    best = {k: min(v) for k, v in runs.items()}
    weight_bytes = sum(t.info.nbytes for t in plan.quantized.values())
    return {"forward_seconds": forward, "rtn_seconds": best["rtn"], "mse_seconds": best["mse"],
            "weighted_seconds": best["mse-weighted"], "ratio": best["mse-weighted"] / best["rtn"],
            "runs": runs, "backends": chosen, "quantized_weight_bytes": weight_bytes,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--layers", type=int, default=None, help="write only this many decoder layers")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the random checkpoint is written")
    parser.add_argument("--weight-step", action="store_true",
                        help="compare conversion with rtn and with E[x^2]-weighted block scales (statistics given)")
    parser.add_argument("--repeat", type=int, default=3, help="with --weight-step: runs of each (best kept)")
    parser.add_argument("--backend", default=None, help="with --weight-step: force a quantize backend")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nvfp4-calib-bench-", dir=args.work_dir) as tmp:
        start = time.perf_counter()
        folder = write_model(Path(tmp) / "model", SHAPES[args.shape], args.layers)
        print(f"wrote a random {args.shape}-shaped checkpoint in {time.perf_counter() - start:.1f} s")
        if args.weight_step:
            r = weight_step(folder, Path(tmp) / "out", samples=args.samples, seq_len=args.seq_len,
                            device=args.device, batch_tokens=args.batch_tokens, repeat=args.repeat,
                            backend=args.backend)
            print(f"statistics of {args.samples} x {args.seq_len} tokens on {args.device}: "
                  f"{r['forward_seconds']:.1f} s (not part of the ratio)")
            print(f"conversion of {r['quantized_weight_bytes'] / 2**20:.0f} MiB of quantized weights, "
                  f"{r['threads']} threads, best of {args.repeat}: rtn {r['rtn_seconds']:.2f} s "
                  f"({r['backends']['rtn']}), unweighted search {r['mse_seconds']:.2f} s, E[x^2]-weighted search "
                  f"{r['weighted_seconds']:.2f} s ({r['backends']['mse-weighted']}): {r['ratio']:.2f}x rtn")
            print(json.dumps(r))
            return
        result = run(folder, samples=args.samples, seq_len=args.seq_len, device=args.device,
                     batch_tokens=args.batch_tokens)
    p = result["predicted"]
    print(f"calibration of {args.samples} x {args.seq_len} = {result['tokens']} tokens, {args.shape} shape "
          f"(random weights), on {args.device}: {result['seconds']:.1f} s "
          f"({result['tokens_per_second']:.0f} tokens/s), "
          f"{result['linears']} Linears observed")
    gpu = f"{result['gpu_peak_gib']:.2f} GiB" if result["gpu_peak_gib"] is not None else "-"
    print(f"peak GPU memory {gpu}; peak RSS {result['rss_peak_gib']:.2f} GiB")
    print(f"predicted: hidden states {p['hidden_states_gib']:.2f} GiB + one layer {p['layer_gib']:.2f} GiB "
          f"+ embedding {p['embedding_gib']:.2f} GiB (only before layer 0) + batch temporaries ~"
          f"{p['batch_mlp_temporaries_gib']:.2f} GiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
