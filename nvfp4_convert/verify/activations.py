"""The converted checkpoint's error on real activations, one decoder layer at a time.

Calibration text runs through the *source* model layer by layer (as calibration does); at every quantized
Linear the exact output ``x W^T`` is compared with what a serving engine computes from the stored tensors:
W4A16 (``x`` times the dequantized weight) and W4A4 (``x`` quantized as NVFP4 with the stored ``input_scale``,
blocks of 16 with E4M3 block scales, times the dequantized weight), and, for reference, W4A4 with the
data-free ``input_scale = 1.0``. Errors are relative RMS: ``sqrt(sum |y - y_q|^2 / sum |y|^2)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calibration.collect import Observer, collect_statistics
from ..errors import ConvertError
from ..kernels import reference
from ..kernels.common import dequantize

SETTINGS = ("w4a16", "w4a4", "w4a4_scale1")


def _pct(value: float) -> str:
    return "       -" if value != value else f"{value:8.3%}"


@dataclass
class ModuleError:
    """Squared-error sums of one Linear's output under each setting, and of the exact output."""

    reference: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)  # only the settings that apply (no W4A4 for W4A16)

    def relative(self, setting: str) -> float:
        if setting not in self.errors:
            return float("nan")
        return (self.errors[setting] / self.reference) ** 0.5 if self.reference else 0.0


@dataclass
class ActivationReport:
    """Per-module relative output errors, and the text that came from."""

    modules: dict[str, ModuleError]
    dataset: str
    samples: int
    seq_len: int

    def by_layer(self) -> dict[str, dict[str, float]]:
        """Mean relative error per decoder layer (module name up to the layer index) and setting."""
        layers: dict[str, list[ModuleError]] = {}
        for name, err in self.modules.items():
            head, sep, rest = name.partition(".layers.")
            key = head + sep + rest.split(".", 1)[0] if sep else name
            layers.setdefault(key, []).append(err)
        return {k: {s: sum(e.relative(s) for e in v) / len(v) for s in SETTINGS} for k, v in layers.items()}


    def lines(self, worst: int = 5) -> list[str]:
        out = [f"activations: {self.samples} x {self.seq_len} tokens of {self.dataset}; relative output error "
               "(RMS) per layer: W4A16 | W4A4 stored input_scale | W4A4 input_scale 1.0"]
        for layer, errs in self.by_layer().items():
            out.append(f"  {layer:<28} {_pct(errs['w4a16'])} {_pct(errs['w4a4'])} {_pct(errs['w4a4_scale1'])}")
        setting = "w4a4" if any("w4a4" in e.errors for e in self.modules.values()) else "w4a16"
        top = sorted(self.modules.items(), key=lambda kv: -kv[1].relative(setting))[:worst]
        out.append(f"worst {setting.upper()} modules: " + ", ".join(f"{m} {e.relative(setting):.2%}" for m, e in top))
        return out

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "samples": self.samples, "seq_len": self.seq_len,
                "modules": {m: {s: e.relative(s) for s in SETTINGS} for m, e in self.modules.items()},
                "layers": self.by_layer()}


class _StoredTensors:
    """The quantized tensors of a converted checkpoint, read per module."""

    def __init__(self, out: Path):
        from safetensors import safe_open

        index = out / "model.safetensors.index.json"
        if not index.is_file():
            raise ConvertError("no model.safetensors.index.json", where=str(out), fix="Give a finished conversion")
        self.weight_map = json.loads(index.read_text())["weight_map"]
        self.out, self._open = out, safe_open
        self.modules = {n[: -len(".weight_scale")] for n in self.weight_map if n.endswith(".weight_scale")}

    def get(self, name: str) -> torch.Tensor:
        with self._open(str(self.out / self.weight_map[name]), "pt") as f:
            return f.get_tensor(name)

    def module(self, m: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dequantized weight (float32) and input_scale (None for W4A16)."""
        w = dequantize(self.get(f"{m}.weight"), self.get(f"{m}.weight_scale"), self.get(f"{m}.weight_scale_2"))
        scale = self.get(f"{m}.input_scale") if f"{m}.input_scale" in self.weight_map else None
        return w, scale


def _fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    packed, blocks = reference.quantize(x, scale.to(x.device))
    return dequantize(packed, blocks, scale.to(x.device))


class _ErrorObserver(Observer):
    def __init__(self, layer, rows, wanted, index, *, stored: _StoredTensors):
        super().__init__(layer, rows, wanted, index)
        self.stored = stored
        self.loaded: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def record(self, modules, x, weight) -> None:
        flat = x.reshape(-1, x.shape[-1])
        if not flat.numel():
            return
        rows = weight.reshape(-1, weight.shape[-1])
        xf = flat.float()
        quantized = {}
        for m, first, stop in modules:
            if m not in self.loaded:
                w, scale = self.stored.module(m)
                self.loaded[m] = (w.to(x.device), scale)
            wq, scale = self.loaded[m]
            exact = xf @ rows[first:stop].float().T
            err = self.stats.setdefault(m, ModuleError())
            err.reference += exact.square().sum().item()
            candidates = {"w4a16": xf}
            if scale is not None:
                for key, value in (("w4a4", scale.float()), ("w4a4_scale1", torch.tensor(1.0))):
                    if value.item() not in quantized:
                        quantized[value.item()] = _fake_quantize(flat, value)
                    candidates[key] = quantized[value.item()]
            for setting, inputs in candidates.items():
                err.errors[setting] = err.errors.get(setting, 0.0) + (exact - inputs @ wq.T).square().sum().item()


def activation_errors(out: Path, source, plan, config: dict, data, *, device: str | None = None,
                      progress: bool = True, log: Callable[[str], None] = print) -> ActivationReport:
    """Run ``data`` through ``source`` layer by layer and measure every quantized Linear of ``out`` on it."""
    from functools import partial

    stored = _StoredTensors(Path(out))
    modules = {m for m in stored.modules if m in plan.tensors or f"{m}.weight" in plan.tensors}
    if not modules:
        raise ConvertError("the checkpoint has no quantized Linear the source has", where=str(out),
                           fix="Pass the --source it was converted from")
    errors = collect_statistics(source=source, plan=plan, config=config, data=data, device=device,
                                progress=progress, modules=modules, observer=partial(_ErrorObserver, stored=stored),
                                log=log)
    return ActivationReport(modules=errors, dataset=data.dataset, samples=data.samples, seq_len=data.seq_len)


def verify_activations(out: Path, *, source: str, dataset: str, samples: int, seq_len: int,
                       column: str | None = None, split: str | None = None, revision: str | None = None,
                       token: str | None = None, endpoint: str | None = None, progress: bool = True
                       ) -> ActivationReport:
    """:func:`activation_errors` from a source id/folder and calibration text, as ``verify --activations`` runs it."""
    from ..calibration.data import load_calibration_data, load_tokenizer
    from ..config_fields import read_model_config
    from ..plan import build_plan
    from ..recipes import load_recipe
    from ..sources import open_source

    src = open_source(source, revision=revision, token=token, endpoint=endpoint)
    try:
        config = read_model_config(src)
        plan = build_plan(config=config, headers=src.headers(), weight_map=getattr(src, "weight_map", None),
                          recipe=load_recipe(config=config), where=src.description)
        data = load_calibration_data(dataset, tokenizer=load_tokenizer(src, where=src.description), samples=samples,
                                     seq_len=seq_len, column=column, split=split, endpoint=endpoint, token=token)
        return activation_errors(Path(out), src, plan, config, data, progress=progress)
    finally:
        src.close()
