"""``input_scale`` from calibration statistics, as ModelOpt 0.47 exports it.

ModelOpt's NVFP4 input quantizer keeps one per-tensor amax (max calibration: max|x| over every calibration
token) and exports ``input_scale = amax / (6 * 448)`` (computed by the shared global-scale rule, which
reproduces its GPU arithmetic). An amax that is zero (or never set) is exported as the quantizer's maxbound,
6.0 (``TensorQuantizer._sanitize_export_amax``).

MoE experts: with transformers' fused expert modules ModelOpt has one input quantizer per projection shared
by all experts of a layer (``_QuantFusedExperts``), and with per-expert modules it syncs their input amax to
the layer's maximum (``set_expert_quantizer_amax`` / ``layer_sync_moe_local_experts_amax``). Either way every
expert of a layer, including one no calibration token reached, gets the layer-wide maximum for that
projection. Fused partners (q/k/v, gate/up, w1/w3) share their group's maximum, as TensorRT-LLM asserts.
"""

from __future__ import annotations

import torch

from ..kernels.common import E2M1_MAX, E4M3_MAX, global_scale
from ..plan import EXPERT_MODULE, Plan
from .collect import LinearStats

UNCALIBRATED_AMAX = E2M1_MAX  # ModelOpt's maxbound, used for an amax of zero
SATURATION_AT_ONE = E2M1_MAX * E4M3_MAX  # with input_scale = 1.0, activations above this saturate


def calibrated_amax(plan: Plan, stats: dict[str, LinearStats], *, headroom: float = 1.0,
                    modules: set[str] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Each quantized module's input amax after expert and fusion-group sharing, and the modules no token reached.

    ``headroom`` multiplies every amax (1.0 is ModelOpt's value, needed for byte equality). ``modules`` limits
    this to some quantized modules (e.g. one decoder layer's, whose experts and fused groups it holds whole).
    """
    quantized = plan.quantized if modules is None else [m for m in plan.quantized if m in modules]
    amax = {m: s.amax.float().reshape(()) for m, s in stats.items()
            if m in plan.quantized and (modules is None or m in modules) and s.tokens}
    experts: dict[tuple[str, str], torch.Tensor] = {}
    for m, a in amax.items():
        if e := EXPERT_MODULE.match(m):
            key = (e["layer"], e["leaf"])
            experts[key] = torch.maximum(experts[key], a) if key in experts else a
    unreached = []
    for m in quantized:
        if e := EXPERT_MODULE.match(m):
            if m not in amax:
                unreached.append(m)
            if (e["layer"], e["leaf"]) in experts:
                amax[m] = experts[(e["layer"], e["leaf"])]
        elif m not in amax:
            unreached.append(m)
    shared: dict[str, torch.Tensor] = {}
    for group in plan.groups:
        if modules is not None and group[0] not in modules:
            continue
        values = [amax[m] for m in group if m in amax]
        top = torch.stack(values).amax() if values else torch.tensor(0.0)
        if top == 0:
            top = torch.tensor(UNCALIBRATED_AMAX)
        for m in group:
            shared[m] = top * headroom if headroom != 1.0 else top
    return shared, unreached


def input_scales(amax: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``input_scale`` (float32 0-dim) per module from its (shared) amax."""
    return {m: global_scale(a).reshape(()) for m, a in amax.items()}


def saturation_report(amax: dict[str, torch.Tensor]) -> list[str]:
    """Modules whose calibrated amax exceeds what the data-free ``input_scale = 1.0`` represents."""
    over = sorted((a.item(), m) for m, a in amax.items() if a.item() > SATURATION_AT_ONE)
    return [f"{m}: max|x| {a:.5g} > {SATURATION_AT_ONE:g}" for a, m in reversed(over)]
