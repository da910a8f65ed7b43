"""Independent checks of a converted checkpoint against its source, for tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from nvfp4_convert.kernels import reference
from nvfp4_convert.kernels.common import global_scale
from nvfp4_convert.output import STATE_DIR


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                assert key not in tensors, f"{key} appears in two shards"
                tensors[key] = f.get_tensor(key)
    return tensors


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def recompute_check(src: Path, out: Path, *, weight_only: bool = False) -> dict:
    """Recompute every quantized tensor of ``out`` from ``src`` and compare bytes; kept tensors must be identical.

    Groups are rebuilt from the written ``weight_scale_2`` values: modules sharing one must be exactly
    the fused partners (q/k/v, gate/up, w1/w3) and their value must be ``global_scale`` of max|W| over the group.
    """
    source, result = load_all(src), load_all(out)
    config = json.loads((out / "config.json").read_text())
    hf = json.loads((out / "hf_quant_config.json").read_text())
    assert config["quantization_config"]["ignore"] == hf["quantization"]["exclude_modules"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(result)
    for name, shard in index["weight_map"].items():
        with safe_open(out / shard, "pt") as f:
            assert name in f.keys()
    quantized = sorted(k[: -len(".weight_scale")] for k in result if k.endswith(".weight_scale"))
    partners = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu", "w1": "gu",
                "w3": "gu"}
    groups: dict[tuple, list[str]] = {}
    for m in quantized:
        parent, _, leaf = m.rpartition(".")
        groups.setdefault((parent, partners.get(leaf, leaf)), []).append(m)
    for members in groups.values():
        amax = max(source[f"{m}.weight"].abs().amax().float() for m in members)
        ws2 = global_scale(amax)
        for m in members:
            packed, scales = reference.quantize(source[f"{m}.weight"], ws2)
            assert torch.equal(result[f"{m}.weight"], packed), m
            assert torch.equal(result[f"{m}.weight_scale"].view(torch.uint8), scales.view(torch.uint8)), m
            assert result[f"{m}.weight_scale_2"].dtype == torch.float32 and result[f"{m}.weight_scale_2"].dim() == 0
            assert raw_bytes(result[f"{m}.weight_scale_2"]) == raw_bytes(ws2), m
            if weight_only:
                assert f"{m}.input_scale" not in result
            else:
                assert result[f"{m}.input_scale"].dim() == 0 and result[f"{m}.input_scale"].item() == 1.0
    produced = {f"{m}.{s}" for m in quantized for s in ("weight", "weight_scale", "weight_scale_2", "input_scale")}
    for name, tensor in result.items():
        if name not in produced:
            assert name in source, f"{name} was invented"
            assert source[name].dtype == tensor.dtype and raw_bytes(source[name]) == raw_bytes(tensor), name
    for name in source:
        module = name[: -len(".weight")]
        assert name in result or module in quantized, f"{name} was dropped"
    return {"quantized": quantized, "groups": [g for g in groups.values() if len(g) > 1]}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of the checkpoint (the hidden resume record, which names the output path, aside)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and STATE_DIR not in p.parts}


def assert_one_line_error(result, *needles: str) -> None:
    """A CLI result that failed with exit 2 and exactly one ``error:`` line on stderr naming ``needles``."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in err[0], err[0]


# Runs the CLI in a child process that SIGKILLs itself on the N-th call of one internal function.
KILLER = """
import os, signal, sys
import nvfp4_convert.{module} as mod
target, n = "{func}", {n}
cls, _, attr = target.rpartition(".")
owner = getattr(mod, cls) if cls else mod
original = getattr(owner, attr)
calls = [0]
def wrapper(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(owner, attr, wrapper)
if "{module}" == "output":  # rebind names imported into convert
    import nvfp4_convert.converter as conv
    if hasattr(conv, attr):
        setattr(conv, attr, wrapper)
from nvfp4_convert.cli import main
main(sys.argv[1:])
"""


# Resume does not depend on the backend: the reference needs no numba start-up in each child process.
FAST = ("--no-progress", "--backend", "reference")


def run_cli(args, *, kill=None):
    plain = "from nvfp4_convert.cli import main; import sys; main(sys.argv[1:])"
    code = KILLER.format(module=kill[0], func=kill[1], n=kill[2]) if kill else plain
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
