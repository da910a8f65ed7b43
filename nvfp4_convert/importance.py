"""Per-input-channel error weights for ``--scales mse-weighted``: where a weight's rounding error matters.

The weighted block-scale search minimizes ``sum_i h_i (w_i - q_i)^2`` with one weight ``h_i`` per input
channel of a Linear layer, ideally ``E[x_i^2]`` of its input. :class:`ChannelWeights` is the interface the
pipeline asks; calibration supplies measured ``E[x_i^2]`` through :class:`FixedChannelWeights`, and
:class:`DataFreeProxy` estimates it from the checkpoint's own tensors:

* q/k/v and gate/up read the preceding RMSNorm's output: ``h_i = g_i^2 / c_i^2`` with ``g`` the norm's
  weight (``1 + g`` for Gemma-style norms) and ``c_i = sum_j W[j, i]^2`` the energy of the layer's own input
  column ``i``. The normalized residual stream is far from unit variance per channel (a few channels carry
  most of its energy) and trained layers read such channels with small weights, so ``1 / c_i^2`` stands in
  for the missing per-channel variance (the exponent is measured: 1, 1.5, 2, 2.5 remove 27%, 31%, 32%,
  26% of RTN's KL below). An all-zero column gets no weight (its error is zero anyway), and ``c`` is
  floored at ``FLOOR`` times its mean;
* o_proj reads the attention output, a mix of value vectors: ``h_j = sum_k W_v[j', k]^2 g_k^2`` with ``j'``
  the value channel that feeds channel ``j`` (grouped-query heads repeat);
* down_proj reads ``silu(gate) * up``: ``h_j = E[silu(z)^2] * sum_k W_up[j, k]^2 g_k^2`` with ``z`` normal of
  variance ``sum_k W_gate[j, k]^2 g_k^2`` (a unit-variance normalized input, weights as independent random
  projections).

Measured on SmolLM2-135M (``python benchmarks/accuracy.py``, KL to BF16 over 1,337 tokens), the share of
round-to-nearest's KL removed: unweighted ``mse`` 12.4%; this proxy 32.0%; with ``h = g^2`` for the norm
readers (no column energies) 19.0%; calibrated ``E[x^2]`` of 4k tokens of other text 57%. On 2,044 tokens
of Python's documentation instead: ``mse`` 8.0%, this proxy 29.0%, ``h = g^2`` 21.4%.

Anything else (MoE routers' consumers, unknown layouts) gets no weights, i.e. plain ``mse``. Weights are
normalized to mean 1 and floored at 1e-3, so a channel the proxy thinks is dead still counts a little.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch

Rows = Callable[[str], Iterator[tuple[int, torch.Tensor]]]  # tensor name -> (first_row, rows) chunks
FLOOR = 1e-3

_ATTN = re.compile(r"^(?P<layer>.*)\.self_attn\.(?P<proj>q_proj|k_proj|v_proj|o_proj)$")
_MLP = re.compile(r"^(?P<layer>.*?)\.mlp(?P<expert>(?:\.experts\.\d+|\.shared_experts?)?)"
                  r"\.(?P<proj>gate_proj|up_proj|down_proj)$")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class ChannelWeights(Protocol):
    """Where the per-input-channel weights of each quantized module come from."""

    def needs(self, module: str) -> list[str]:
        """Source tensors :meth:`weights` reads for ``module`` (their shards are held while it runs)."""
        ...

    def weights(self, module: str, rows: Rows) -> torch.Tensor | None:
        """float32 ``[K]`` weights for ``module`` (finite, > 0), or None for an unweighted search."""
        ...

    def order(self, module: str) -> tuple:
        """Sort key within an output shard, so modules are computed after the ones they read."""
        ...


class FixedChannelWeights:
    """Weights given up front, e.g. calibrated ``E[x^2]``: ``{module: [K] tensor}``."""

    def __init__(self, table: dict[str, torch.Tensor]):
        self.table = {m: _normalized(w.double()) for m, w in table.items()}

    def needs(self, module: str) -> list[str]:
        return []

    def weights(self, module: str, rows: Rows) -> torch.Tensor | None:
        return self.table.get(module)

    def order(self, module: str) -> tuple:
        return ()


class DataFreeProxy:
    """The data-free estimate described in the module docstring, from a model's ``config.json``."""

    def __init__(self, config: dict, tensor_names: set[str]):
        text = config.get("text_config") or config
        self.heads = int(text.get("num_attention_heads") or 0)
        self.kv_heads = int(text.get("num_key_value_heads") or self.heads or 0)
        hidden = int(text.get("hidden_size") or 0)
        self.head_dim = int(text.get("head_dim") or (hidden // self.heads if self.heads else 0))
        self.offset_norm = str(config.get("model_type", "")).startswith("gemma")
        self.names = tensor_names
        self._energy: dict[str, torch.Tensor] = {}  # row energies sum_k W[j,k]^2 g_k^2, by weight name

    def _norm(self, module: str) -> str | None:
        m = _ATTN.match(module)
        if m and m["proj"] != "o_proj":
            name = f"{m['layer']}.input_layernorm.weight"
            return name if name in self.names else None
        m = _MLP.match(module)
        if m and m["proj"] != "down_proj":
            name = f"{m['layer']}.post_attention_layernorm.weight"
            return name if name in self.names else None
        return None

    def _inputs(self, module: str) -> list[str]:
        """The weights whose row energies make up ``module``'s weights (o_proj: v; down_proj: gate, up)."""
        m = _ATTN.match(module)
        if m and m["proj"] == "o_proj" and self.heads and self.kv_heads and self.head_dim:
            return [f"{m['layer']}.self_attn.v_proj"]
        m = _MLP.match(module)
        if m and m["proj"] == "down_proj":
            base = f"{m['layer']}.mlp{m['expert']}"
            return [f"{base}.gate_proj", f"{base}.up_proj"]
        return []

    def needs(self, module: str) -> list[str]:
        norm = self._norm(module)
        if norm:
            return [norm, f"{module}.weight"]
        inputs = self._inputs(module)
        norms = [self._norm(i) for i in inputs]
        if not inputs or None in norms or any(f"{i}.weight" not in self.names for i in inputs):
            return []
        return [*(f"{i}.weight" for i in inputs), *dict.fromkeys(norms)]

    def order(self, module: str) -> tuple:
        layer = _LAYER_INDEX.search(module + ".")
        return (int(layer.group(1)) if layer else -1, 1 if self._inputs(module) else 0)

    def _gamma2(self, norm: str, rows: Rows) -> torch.Tensor:
        g = torch.cat([r.reshape(-1) for _, r in rows(norm)]).double()
        return (g + 1 if self.offset_norm else g).pow(2)

    def _column_energy(self, module: str, rows: Rows) -> torch.Tensor:
        """``c_i = sum_j W[j, i]^2`` of ``module``'s weight (float64 ``[K]``)."""
        return sum(r.double().pow(2).sum(0) for _, r in rows(f"{module}.weight"))

    def _row_energy(self, module: str, rows: Rows) -> torch.Tensor:
        name = f"{module}.weight"
        if name not in self._energy:
            g2 = self._gamma2(self._norm(module), rows)
            parts = [r.double().pow(2) @ g2 for _, r in rows(name)]
            self._energy[name] = torch.cat(parts)
        return self._energy[name]

    def weights(self, module: str, rows: Rows) -> torch.Tensor | None:
        needs = self.needs(module)
        if not needs:
            return None
        norm = self._norm(module)
        if norm:
            c = self._column_energy(module, rows)
            h = self._gamma2(norm, rows) / c.clamp(min=FLOOR * float(c.mean())).pow(2)
            return _normalized(torch.where(c > 0, h, 0.0))
        inputs = self._inputs(module)
        if len(inputs) == 1:  # o_proj: value channel of each attention-output channel
            v = self._row_energy(inputs[0], rows).view(self.kv_heads, self.head_dim)
            h = v.repeat_interleave(self.heads // self.kv_heads, dim=0).reshape(-1)
        else:
            gate, up = (self._row_energy(i, rows) for i in inputs)
            h = silu_square_mean(gate) * up
        for i in inputs:  # each input feeds one consumer
            self._energy.pop(f"{i}.weight", None)
        return _normalized(h)


_NODES, _WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.hermite_e.hermegauss(64))
_WEIGHTS = _WEIGHTS / math.sqrt(2 * math.pi)


def silu_square_mean(variance: torch.Tensor) -> torch.Tensor:
    """``E[silu(z)^2]`` for ``z ~ N(0, variance)`` (float64, Gauss-Hermite quadrature)."""
    z = variance.double().clamp(min=0).sqrt().unsqueeze(-1) * _NODES
    return ((z * torch.sigmoid(z)).pow(2) * _WEIGHTS).sum(-1)


def _normalized(h: torch.Tensor) -> torch.Tensor:
    h = torch.nan_to_num(h.double(), nan=0.0, posinf=0.0).clamp(min=0)
    mean = h.mean()
    if not mean > 0:
        return torch.ones_like(h, dtype=torch.float32)
    return (h / mean).clamp(min=FLOOR).float()
