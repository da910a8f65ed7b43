"""Activation statistics, one decoder layer at a time.

The samples are embedded once; then each decoder layer is read from the source alone, materialized on the
calibration device, run over every sample, and dropped, its outputs becoming the next layer's inputs. For
every quantized Linear it records what ModelOpt's max calibration records (the input's max|x|) and the
per-input-channel second moment E[x_k^2] that activation-aware block scales weight the error by.

As in ModelOpt's calibration (quantizers only collect statistics while the forward runs), every layer sees
its upstream layers in full precision: neither weights nor activations are quantized during calibration.

Memory: one layer's weights plus the hidden states of all samples (``samples x seq_len x hidden`` in the
model's dtype, updated in place) plus one batch's temporaries.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from ..errors import ConvertError
from ..fp8 import DROPPED_SUFFIXES, check_scale_values, dequantize
from ..output import write_bytes_atomic
from ..plan import Plan
from ..safetensors_io import TORCH_DTYPES, map_tensor
from . import layers as L
from .data import CalibrationData

BATCH_TOKENS = 16384  # tokens per forward batch: bounds one batch's temporaries
CHECKPOINT_SECONDS = 600.0  # how often the hidden states are saved for resume (they are large)
_HIDDEN_FILE = "hidden.safetensors"


@dataclass
class LinearStats:
    """What calibration saw at one Linear's input."""

    amax: torch.Tensor  # float32 0-dim: max|x| over every token (ModelOpt's max calibration)
    sumsq: torch.Tensor  # float64 [in_features]: sum of x_k^2 over tokens
    tokens: int  # how many tokens reached it (MoE experts see a subset)

    @property
    def second_moment(self) -> torch.Tensor:
        """E[x_k^2] per input channel (float32); zeros when no token reached the module."""
        return (self.sumsq / max(self.tokens, 1)).float()


class Observer(TorchFunctionMode):
    """Sees every ``F.linear`` call and credits its input to the checkpoint modules whose weight rows it uses.

    This one records :class:`LinearStats`; subclasses override :meth:`record` to measure other things.
    """

    def __init__(self, layer: torch.nn.Module, rows: dict[str, tuple[str, int, int]], wanted: set[str],
                 index: int):
        super().__init__()
        self.params = {p.untyped_storage().data_ptr(): (n, p) for n, p in layer.named_parameters() if p.dim() >= 2}
        self.rows: dict[str, list[tuple[int, int, str]]] = {}
        for name, (param, first, count) in rows.items():
            if name.endswith(".weight") and name[: -len(".weight")] in wanted:
                self.rows.setdefault(param, []).append((first, first + count, name[: -len(".weight")]))
        self.cache: dict[tuple[int, int, int], list[tuple[str, int, int]]] = {}
        self.stats: dict = {}
        self._last: tuple | None = None  # q/k/v (gate/up) read the same input tensor: reduce it once

    def _modules(self, weight: torch.Tensor) -> list[tuple[str, int, int]]:
        """``(module, first row, stop row)`` of each checkpoint module held by ``weight`` (rows of ``weight``)."""
        key = (weight.untyped_storage().data_ptr(), weight.storage_offset(), weight.numel())
        if key not in self.cache:
            found: list[tuple[str, int, int]] = []
            owner = self.params.get(key[0])
            if owner is not None and weight.is_contiguous() and weight.shape[-1] == owner[1].shape[-1]:
                name, param = owner
                k = param.shape[-1]
                first = (weight.storage_offset() - param.storage_offset()) // k
                stop = first + weight.numel() // k
                found = [(m, a - first, b - first) for a, b, m in self.rows.get(name, []) if a >= first and b <= stop]
            self.cache[key] = found
        return self.cache[key]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            modules = self._modules(weight)
            if modules:
                self.record(modules, x, weight)
        return func(*args, **kwargs)

    def record(self, modules: list[tuple[str, int, int]], x: torch.Tensor, weight: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1])
        if not flat.numel():
            return
        if self._last is not None and self._last[0] is x and self._last[1] == x._version:
            amax, sumsq = self._last[2:]
        else:  # (holding x keeps its memory from being reused by another tensor while cached)
            amax = flat.abs().amax().float()
            sumsq = flat.float().square().sum(0).double()
            self._last = (x, x._version, amax, sumsq)
        for m, _, _ in modules:
            s = self.stats.get(m)
            if s is None:
                self.stats[m] = LinearStats(amax.clone(), sumsq.clone(), flat.shape[0])
            else:
                s.amax = torch.maximum(s.amax, amax)
                s.sumsq += sumsq
                s.tokens += flat.shape[0]


def collect_statistics(**options) -> dict:
    """Run the data through the source model layer by layer and return each quantized Linear's statistics.

    Takes :class:`LayerCalibration`'s arguments; the result maps each observed module to what its
    observer's ``stats`` holds (:class:`LinearStats` by default).
    """
    calibration = LayerCalibration(**options)
    try:
        calibration.run_through(calibration.count - 1)
        return calibration.statistics()
    finally:
        calibration.close()


class LayerCalibration:
    """Activation statistics, collected one decoder layer at a time as far as they are asked for.

    :meth:`run_through` runs the layers up to the one asked for, so a conversion can quantize the modules of
    each layer as soon as that layer is calibrated, while its source shards are still there.

    Args:
        source: the checkpoint (its shards are acquired one decoder layer at a time).
        plan: the conversion plan (which modules are quantized; tensor locations).
        config: the source ``config.json``.
        data: the token ids.
        device: where layers run (default: ``cuda`` when present, else ``cpu``).
        state_dir: where per-layer statistics (and, every ``checkpoint_seconds``, the hidden states) are saved
            atomically, so an interrupted run resumes; None keeps nothing.
        state_key: what else saved statistics must have been made with (e.g. the conversion's fingerprint).
        checkpoint_seconds: how often to save the hidden states (default :data:`CHECKPOINT_SECONDS`).
        batch_tokens: tokens per forward batch.
        modules: the Linears to observe (default: the plan's quantized ones).
        observer: what observes them (``observer(layer, rows, modules, layer_index)``); the default records
            :class:`LinearStats`.
    """

    def __init__(self, *, source, plan: Plan, config: dict, data: CalibrationData, device: str | None = None,
                 state_dir: Path | None = None, state_key: str = "", progress: bool = True,
                 checkpoint_seconds: float | None = None, batch_tokens: int = BATCH_TOKENS,
                 modules: set[str] | None = None, observer: Callable[..., Observer] = Observer,
                 log: Callable[[str], None] = print):
        self.source, self.plan, self.data, self.progress, self.observer = source, plan, data, progress, observer
        self.checkpoint_seconds = CHECKPOINT_SECONDS if checkpoint_seconds is None else checkpoint_seconds
        self.batch_tokens, self.modules = batch_tokens, modules
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _model_dtype(plan)
        self.model = L.build_skeleton(config, dtype=self.dtype, where=source.description)
        self.prefix, self.owner, self.layers = L.decoder_layers(self.model)
        self.count = self.model.config.get_text_config().num_hidden_layers
        self.by_layer, self.outside = _tensors_by_layer(plan, L.own_names(self.model, list(plan.tensors)),
                                                        self.prefix, self.count, where=source.description)
        self.store = _StatsStore(state_dir, f"{state_key}:{data.fingerprint()}", self.count) \
            if state_dir is not None else None
        self.done: dict[int, dict] = self.store.finished_layers() if self.store else {}
        self.start, self._hidden = 0, None
        if len(self.done) < self.count:
            self.start, self._hidden = self.store.hidden() if self.store else (0, None)
            self.done = {i: st for i, st in self.done.items() if i < self.start}
        self.next_layer = self.start if len(self.done) < self.count else self.count
        self._layer_of = {n.removesuffix(".weight"): i for i, names in enumerate(self.by_layer) for n in names}
        self._last_layer: dict[str, int] = {}  # source shard -> the last layer reading it
        for i, names in enumerate(self.by_layer):
            for n in names:
                for r in plan.reads(n):
                    self._last_layer[plan.tensors[r].shard] = i
        self._outside = {plan.tensors[r].shard for n in self.outside for r in plan.reads(n)}
        self._embedded, self._reading = False, self.next_layer  # the first layer whose weights are still to read
        self._steps = self._run()

    def layer_of(self, module: str) -> int | None:
        """The decoder layer holding ``module`` (None: not in a calibrated layer)."""
        return self._layer_of.get(module)

    def will_read(self, shard: str) -> bool:
        """Whether calibration has still to read source shard ``shard``."""
        if self.next_layer >= self.count:
            return False
        return self._last_layer.get(shard, -1) >= self._reading or not self._embedded and shard in self._outside

    def run_through(self, layer: int) -> None:
        """Run the decoder layers up to ``layer`` (those already run are not run again)."""
        while self.next_layer <= layer:
            next(self._steps)

    def statistics(self) -> dict:
        """What the observers recorded, for every layer run (or resumed) so far."""
        return {m: st for i in sorted(self.done) for m, st in self.done[i].items()}

    def close(self) -> None:
        """Release what is held (the statistics stay)."""
        self._steps.close()

    def _run(self):
        """Runs one decoder layer per step (after the embeddings, with the first)."""
        plan, data, dev, dtype, model, count = self.plan, self.data, self.device, self.dtype, self.model, self.count
        shards = _Shards(self.source, plan, self._last_layer)
        batch = max(1, min(data.samples, self.batch_tokens // data.seq_len))
        batches = [slice(b, min(b + batch, data.samples)) for b in range(0, data.samples, batch)]
        bar = tqdm(total=count, initial=self.start, unit="layer", desc="calibrating", disable=not self.progress,
                   dynamic_ncols=True)
        try:
            kwargs_by_size, hidden = self._embed(shards, batches)
            self._embedded = True
            shards.release_done(self.start - 1)
            last_checkpoint = time.monotonic()
            for i in range(self.start, count):
                layer = self.layers[i]
                weights = shards.tensors(self.by_layer[i])
                L.load_into(model, weights, dtype=dtype, device=dev)
                L.to_device(layer, dev)
                held = {n.removesuffix(".weight") for n in self.by_layer[i]}
                wanted = {m for m in (plan.quantized if self.modules is None else self.modules) if m in held}
                rows = L.checkpoint_rows(model, f"{self.prefix}.{i}", layer, list(weights))
                watching = self.observer(layer, rows, wanted, i)
                del weights
                with torch.no_grad(), watching:
                    for b in batches:
                        out = layer(hidden[b], **kwargs_by_size[b.stop - b.start][i])
                        hidden[b] = out[0] if isinstance(out, tuple) else out
                L.free(layer)
                self._reading = i + 1
                shards.release_done(i)
                _check_finite(watching.stats)
                for st in watching.stats.values():  # statistics are small: kept on the CPU, whatever the device
                    if isinstance(st, LinearStats):
                        st.amax, st.sumsq = st.amax.cpu(), st.sumsq.cpu()
                self.done[i] = watching.stats
                if self.store:
                    self.store.save_layer(i, watching.stats)
                    if i + 1 == count:
                        self.store.drop_hidden()
                    elif time.monotonic() - last_checkpoint >= self.checkpoint_seconds:
                        self.store.save_hidden(i + 1, hidden)
                        last_checkpoint = time.monotonic()
                bar.update(1)
                self.next_layer = i + 1
                yield i
        finally:
            bar.close()
            shards.release_all()

    def _embed(self, shards: _Shards, batches: list[slice]) -> tuple[dict[int, list[dict]], torch.Tensor]:
        """Embed the samples (what runs before the first layer reads only what it needs) and record each
        layer's keyword arguments per batch size; resuming, the hidden states come from the checkpoint."""
        model, dev, data = self.model, self.device, self.data

        def load(names: list[str]) -> None:
            L.load_into(model, shards.tensors(names), dtype=self.dtype, device=dev)
            L.to_device(model, dev)

        L.to_device(model, dev)
        kwargs_by_size: dict[int, list[dict]] = {}
        fresh = self._hidden is None
        hidden = None if fresh else self._hidden.to(dev)
        self._hidden = None
        with L.loaded_on_call(model, self.outside, load):
            for b in batches:
                ids = data.input_ids[b].to(dev)
                h, kwargs = L.layer_inputs(self.owner, self.layers, ids, self.count)
                kwargs_by_size.setdefault(ids.shape[0], kwargs)
                if fresh:
                    if hidden is None:  # filled batch by batch: the samples' hidden states exist once
                        hidden = torch.empty((data.samples, *h.shape[1:]), dtype=h.dtype, device=h.device)
                    hidden[b] = h
                elif len(kwargs_by_size) == len({s.stop - s.start for s in batches}):
                    break  # resuming: only each batch size's keyword arguments are needed
        L.free(model)
        return kwargs_by_size, hidden


def _model_dtype(plan: Plan) -> torch.dtype:
    counts: dict[str, int] = {}
    for t in plan.quantized.values():
        dtype = plan.compute_dtype(t.name)  # FP8 weights: BF16, as they are dequantized
        counts[dtype] = counts.get(dtype, 0) + 1
    return TORCH_DTYPES[max(counts, key=counts.get)] if counts else torch.bfloat16


def _tensors_by_layer(plan: Plan, own: dict[str, str], prefix: str, count: int, *, where: str
                      ) -> tuple[list[list[str]], list[str]]:
    """Source tensor names of each decoder layer, and those needed before the first (not the head).

    ``own`` maps each checkpoint name to the model's (``prefix`` is the model's name of its decoder layers).
    """
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    by_layer: list[list[str]] = [[] for _ in range(count)]
    outside: list[str] = []
    for name in plan.tensors:
        if m := pattern.match(own[name]):
            if int(m[1]) < count:
                by_layer[int(m[1])].append(name)
        elif not own[name].startswith("lm_head."):
            outside.append(name)
    if not all(by_layer):
        missing = next(i for i, names in enumerate(by_layer) if not names)
        raise ConvertError(f"the checkpoint has no tensors for decoder layer {missing} ({prefix}.{missing}.*, "
                           "or a layout transformers renames to it)", where=where,
                           fix="Check that config.json matches the weights")
    return by_layer, outside


def _check_finite(stats: dict[str, LinearStats]) -> None:
    for module, s in stats.items():
        if isinstance(s, LinearStats) and not torch.isfinite(s.amax):
            raise ConvertError(f"calibration activations reach {s.amax.item()} at the input of {module}",
                               where="calibration", fix="The model overflows in its dtype on this data; "
                               "check the weights, or convert without --calibrate")


class _Shards:
    """Source shards held while calibration reads them: each is released after the last layer reading it."""

    def __init__(self, source, plan: Plan, last_layer: dict[str, int]):
        self.source, self.plan, self.last_layer = source, plan, last_layer
        self.held: dict[str, Path] = {}
        self.fp8_scales = {w.scale for w in plan.fp8.values()}

    def _map(self, name: str) -> torch.Tensor:
        shard = self.plan.tensors[name].shard
        if shard not in self.held:
            self.held[shard] = self.source.acquire(shard)
        return map_tensor(self.held[shard], self.plan.headers[shard], name)

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named source tensors as the model holds them: FP8 weights dequantized as the converter does
        (their scales and the source's activation scales are not model tensors)."""
        out = {}
        for name in names:
            if name in self.fp8_scales or name.endswith(DROPPED_SUFFIXES) and self.plan.fp8_flavour:
                continue
            tensor = self._map(name)
            if name in self.plan.fp8:
                spec = self.plan.fp8[name]
                scale = self._map(spec.scale)
                check_scale_values(scale, spec.scale, where=self.plan.tensors[spec.scale].shard)
                tensor = dequantize(tensor, scale, spec.block)
            out[name] = tensor
        return out

    def release_done(self, layer: int) -> None:
        """Release the shards no layer after ``layer`` reads."""
        for shard in [s for s in self.held if self.last_layer.get(s, -1) <= layer]:
            self.source.release(shard)
            del self.held[shard]

    def release_all(self) -> None:
        for shard in list(self.held):
            self.source.release(shard)
            del self.held[shard]


class _StatsStore:
    """Per-layer statistics saved atomically, plus occasional hidden-state checkpoints, for resume."""

    def __init__(self, folder: Path, fingerprint: str, count: int):
        self.folder, self.fingerprint, self.count = Path(folder), fingerprint, count
        self.folder.mkdir(parents=True, exist_ok=True)

    def _layer_path(self, i: int) -> Path:
        return self.folder / f"layer-{i:05d}.safetensors"

    def save_layer(self, i: int, stats: dict[str, LinearStats]) -> None:
        from safetensors.torch import save

        tensors = {}
        for m, s in stats.items():
            tensors[f"{m}.amax"] = s.amax.cpu()
            tensors[f"{m}.sumsq"] = s.sumsq.cpu()
            tensors[f"{m}.tokens"] = torch.tensor(s.tokens, dtype=torch.int64)
        write_bytes_atomic(self._layer_path(i), save(tensors, metadata={"data": self.fingerprint}))

    def _load_layer(self, i: int) -> dict[str, LinearStats] | None:
        from safetensors import safe_open

        path = self._layer_path(i)
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("data") != self.fingerprint:
                    return None
                raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
        except (OSError, ValueError, RuntimeError):  # missing, or damaged: recompute it
            return None
        modules = {k.rsplit(".", 1)[0] for k in raw}
        return {m: LinearStats(raw[f"{m}.amax"], raw[f"{m}.sumsq"], int(raw[f"{m}.tokens"])) for m in modules}

    def finished_layers(self) -> dict[int, dict[str, LinearStats]]:
        """Saved statistics of the leading run of finished layers."""
        done = {}
        for i in range(self.count):
            stats = self._load_layer(i)
            if stats is None:
                break
            done[i] = stats
        return done

    def save_hidden(self, next_layer: int, hidden: torch.Tensor) -> None:
        from safetensors.torch import save_file

        partial = self.folder / (_HIDDEN_FILE + ".partial")
        save_file({"hidden": hidden.contiguous().cpu()}, str(partial),
                  metadata={"data": self.fingerprint, "next_layer": str(next_layer)})
        os.replace(partial, self.folder / _HIDDEN_FILE)

    def hidden(self) -> tuple[int, torch.Tensor | None]:
        """``(next_layer, hidden states)`` of the last checkpoint whose earlier layers are all saved, else (0, None)."""
        from safetensors import safe_open

        path = self.folder / _HIDDEN_FILE
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("data") != self.fingerprint:
                    return 0, None
                next_layer = int(meta["next_layer"])
                if len(self.finished_layers()) < next_layer:
                    return 0, None
                return next_layer, f.get_tensor("hidden")
        except (OSError, ValueError, RuntimeError, KeyError):
            return 0, None

    def drop_hidden(self) -> None:
        (self.folder / _HIDDEN_FILE).unlink(missing_ok=True)


def stats_summary(stats: dict[str, LinearStats]) -> str:
    """One line: how many Linears were observed and the largest input amax."""
    if not stats:
        return "no Linear inputs observed"
    top = max(stats, key=lambda m: stats[m].amax.item())
    return f"{len(stats)} Linear inputs observed; largest max|x| {stats[top].amax.item():.4g} at {top}"

