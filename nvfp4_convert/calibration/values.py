"""Calibrated ``input_scale`` values and channel weights, computed as the conversion asks for them.

Asking for a module's value runs calibration through that module's decoder layer, so a conversion quantizes
each layer's modules right after the layer is calibrated, from the source shards calibration just read
(a Hub source downloads each shard once). Every value depends on its own layer's statistics only: fused
groups and a MoE layer's experts lie within one layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..importance import FixedChannelWeights, Rows
from ..plan import EXPERT_MODULE, Plan
from .collect import LayerCalibration, stats_summary
from .input_scales import calibrated_amax, input_scales, saturation_report


class CalibratedValues:
    """``get(module, default)`` gives a quantized module's calibrated ``input_scale``; as a
    :class:`~nvfp4_convert.importance.ChannelWeights` it gives the module's normalized E[x^2]."""

    def __init__(self, calibration: LayerCalibration, plan: Plan, *, headroom: float = 1.0):
        self.calibration, self.plan, self.headroom = calibration, plan, headroom
        self.by_layer: dict[int | None, set[str]] = {}
        for m in plan.quantized:
            self.by_layer.setdefault(calibration.layer_of(m), set()).add(m)
        self.scales: dict[str, torch.Tensor] = {}
        self.amax: dict[str, torch.Tensor] = {}
        self.table: dict[str, torch.Tensor] = {}
        self.unreached: list[str] = []
        self._ready: set[int | None] = set()

    def _prepare(self, module: str) -> None:
        layer = self.calibration.layer_of(module)
        if layer in self._ready:
            return
        stats = {}
        if layer is not None:  # modules outside the decoder layers are never reached
            self.calibration.run_through(layer)
            stats = self.calibration.done[layer]
        modules = self.by_layer.get(layer, set())
        amax, unreached = calibrated_amax(self.plan, stats, headroom=self.headroom, modules=modules)
        self.amax.update(amax)
        self.scales.update(input_scales(amax))
        self.unreached += unreached
        self.table.update(FixedChannelWeights({m: s.second_moment for m, s in stats.items()
                                               if s.tokens and m in modules}).table)
        self._ready.add(layer)

    def get(self, module: str, default: torch.Tensor | None = None) -> torch.Tensor | None:
        self._prepare(module)
        return self.scales.get(module, default)

    def needs(self, module: str) -> list[str]:
        return []

    def weights(self, module: str, rows: Rows) -> torch.Tensor | None:
        self._prepare(module)
        return self.table.get(module)

    def order(self, module: str) -> tuple:
        return ()

    def report(self, log: Callable[[str], None], *, input_scales: bool) -> None:
        """Log what calibration saw, for the layers it ran."""
        log(f"calibration: {stats_summary(self.calibration.statistics())}")
        if not input_scales:
            return
        experts = [m for m in self.unreached if EXPERT_MODULE.match(m)]
        others = [m for m in self.unreached if not EXPERT_MODULE.match(m)]
        if experts:
            log(f"calibration: {len(experts)} MoE experts got no token; they share their layer's maximum "
                f"(as ModelOpt does), e.g. {experts[0]}")
        if others:
            log(f"warning: calibration never reached {len(others)} quantized Linears (input_scale from "
                f"max|x| = 6), e.g. {others[0]}")
        over = saturation_report(self.amax)
        if over:
            log(f"calibration: {len(over)} Linear inputs exceed 2688, which input_scale = 1.0 would saturate; "
                f"largest {over[0]}")
