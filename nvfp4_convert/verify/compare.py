"""Comparing a converted checkpoint with its source: the error of every quantized weight, and
byte identity of every other tensor. The source is read as the conversion reads it: fused experts
one Linear per expert (:mod:`..stacked`), FP8 weights dequantized to BF16 (:mod:`..fp8`).

The source is streamed one shard at a time (acquired, compared, released), and each tensor a row
chunk at a time, so memory and scratch disk stay bounded whatever the model size.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from ..config_fields import read_model_config
from ..constants import SCALE_SUFFIXES
from ..fp8 import Fp8Weight, check_scale_values, fp8_weights, source_flavour
from ..fp8 import dequantize as dequantize_fp8
from ..kernels import reference
from ..kernels.common import BLOCK, dequantize, grid_position, is_dust, unpack_codes
from ..kernels.reference import cast_e2m1
from ..plan import collect_tensors
from ..safetensors_io import FLOAT_DTYPES, ShardHeader, TensorInfo, read_rows, read_tensor, read_tensor_bytes
from ..sources import open_source
from ..stacked import unfuse

CHUNK_BYTES = 64 * 1024 * 1024  # raw bytes compared at a time
COMPARE_BYTES = 16 * 1024 * 1024  # float32 source rows dequantized at a time (temporaries are several times this)
SQNR_FLOOR_DB = 12.0  # NVFP4 of ordinary weights gives about 20 dB; far less means broken data
SQNR_DROP_DB = 8.0  # a layer this far below the median SQNR is an outlier


class OutputTensors(Protocol):
    """Read access to the converted checkpoint's tensors."""

    tensors: dict[str, tuple[str, TensorInfo]]  # name -> (shard, info)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> bytearray: ...

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor: ...


@dataclass
class LayerError:
    """How far one quantized weight is from its source."""

    module: str
    shape: tuple[int, int]
    sqnr_db: float
    rel_rms: float
    max_code_distance: int  # E2M1 grid steps between a stored code and the rounding of the source value
    outlier: str | None = None
    dust: bool = False  # max|W| below what NVFP4's smallest global scale resolves: (almost) all codes are 0
    gain_vs_rtn: float = 0.0  # share of round-to-nearest's squared error (same weight_scale_2) this output removes


@dataclass
class Comparison:
    """The outcome of :func:`compare_with_source`."""

    source: str
    layers: list[LayerError] = field(default_factory=list)
    kept_compared: int = 0
    identical: int = 0
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (check, what, where)


def compare_with_source(output: OutputTensors, *, quantized: list[str], src: str, revision: str | None = None,
                        token: str | None = None, endpoint: str | None = None, progress: bool = True) -> Comparison:
    """Measure each quantized weight against ``src`` and check every other tensor is unchanged.

    Args:
        output: the converted checkpoint's tensors.
        quantized: its NVFP4 modules (their ``.weight`` is compared by value, not by bytes).
        src: the source checkpoint (local folder or Hub repo id).
        revision: Hub revision of ``src``.
        token: Hub token for a gated or private ``src``.
        endpoint: Hub endpoint URL.
        progress: show a progress bar.
    """
    source = open_source(src, revision=revision, token=token, endpoint=endpoint)
    result = Comparison(source=source.description)
    nvfp4 = set(quantized)
    seen: set[str] = set()
    try:
        config = read_model_config(source) if "config.json" in source.files else {}
        flavour = source_flavour(config, where=source.description) if config else None
        headers, _, _ = unfuse(config, source.headers(), None, where=source.description)
        tensors = collect_tensors(headers, None, where=source.description)
        fp8, not_carried = fp8_weights(flavour, tensors, where=source.description)
        total = sum(t.info.nbytes for t in tensors.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc="compare", disable=not progress) as bar:
            for shard in sorted(headers):
                path = source.acquire(shard)
                try:
                    scales = _fp8_scales(source, shard, path, headers, tensors, fp8)
                    for info in sorted(headers[shard].tensors.values(), key=lambda t: t.data_offsets):
                        seen.add(info.name)
                        bar.update(info.nbytes)
                        if info.name in not_carried:  # FP8 scales and activation scales: not in the output
                            continue
                        spec = fp8.get(info.name)
                        weight = SourceWeight(path, headers[shard], info, spec, scales.get(info.name))
                        module = info.name[: -len(".weight")] if info.name.endswith(".weight") else None
                        if module in nvfp4:
                            _compare_quantized(output, module, weight, result)
                        elif info.name in output.tensors:
                            _compare_kept(output, weight, result)
                        else:
                            result.problems.append(("kept vs source", "source tensor is missing from the output",
                                                    info.name))
                finally:
                    source.release(shard)
    finally:
        source.close()
    scale_names = {m + s for m in nvfp4 for s in SCALE_SUFFIXES}
    for name in sorted(set(output.tensors) - scale_names - seen):
        result.problems.append(("kept vs source", "tensor is not in the source", name))
    flag_outliers(result.layers)
    result.problems += [("error vs source", f"error outlier: {x.outlier}", x.module) for x in result.layers
                        if x.outlier]
    return result


def sqnr_stats(layers: list[LayerError]) -> tuple[float, float] | None:
    """``(median, min)`` SQNR in dB over ``layers``, or None if there are none."""
    values = [x.sqnr_db for x in layers if not math.isnan(x.sqnr_db) and not x.dust]
    return (statistics.median(values), min(values)) if values else None


def flag_outliers(layers: list[LayerError]) -> None:
    """Mark layers whose error is far outside what NVFP4 rounding gives (sets ``outlier``)."""
    stats = sqnr_stats(layers)
    median = stats[0] if stats else math.nan
    for layer in layers:
        if layer.outlier is not None or layer.dust:
            continue
        if math.isnan(layer.sqnr_db):
            layer.outlier = "dequantizes to NaN or Inf"
        elif layer.sqnr_db < SQNR_FLOOR_DB:
            layer.outlier = f"SQNR {layer.sqnr_db:.1f} dB is below the {SQNR_FLOOR_DB:.0f} dB floor"
        elif layer.sqnr_db < median - SQNR_DROP_DB:
            layer.outlier = f"SQNR {layer.sqnr_db:.1f} dB is far below the median {median:.1f} dB"


@dataclass(frozen=True)
class SourceWeight:
    """A source tensor as the conversion reads it: an FP8 weight dequantized to BF16 (:func:`..fp8.dequantize`)."""

    path: Path
    header: ShardHeader
    info: TensorInfo
    fp8: Fp8Weight | None = None
    scale: torch.Tensor | None = None  # the FP8 weight's whole scale tensor

    @property
    def dtype(self) -> str:
        return "BF16" if self.fp8 is not None else self.info.dtype

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        raw = read_rows(self.path, self.header, self.info.name, r0, r1)
        return raw if self.fp8 is None else dequantize_fp8(raw, self.scale, self.fp8.block, row_start=r0)


def _fp8_scales(source, shard: str, path: Path, headers: dict[str, ShardHeader], tensors: dict,
                fp8: dict[str, Fp8Weight]) -> dict[str, torch.Tensor]:
    """The scale of each FP8 weight in ``shard`` (acquiring, one at a time, shards that hold some elsewhere)."""
    wanted: dict[str, list[str]] = {}
    for name in headers[shard].tensors:
        if name in fp8:
            wanted.setdefault(tensors[fp8[name].scale].shard, []).append(name)
    scales = {}
    for where, weights in sorted(wanted.items()):
        held = path if where == shard else source.acquire(where)
        try:
            for name in weights:
                scale = read_tensor(held, headers[where], fp8[name].scale)
                check_scale_values(scale, fp8[name].scale, where=where)
                scales[name] = scale
        finally:
            if where != shard:
                source.release(where)
    return scales


def _compare_kept(output: OutputTensors, src: SourceWeight, result: Comparison) -> None:
    result.kept_compared += 1
    info = src.info
    out = output.tensors[info.name][1]
    if (out.dtype, out.shape) != (src.dtype, info.shape):
        result.problems.append(("kept vs source", f"is {out.dtype}{list(out.shape)}, the source has "
                                f"{src.dtype}{list(info.shape)}", info.name))
        return
    if src.fp8 is None:
        for start in range(0, info.nbytes, CHUNK_BYTES):
            stop = min(info.nbytes, start + CHUNK_BYTES)
            if read_tensor_bytes(src.path, src.header, info.name, start, stop) != output.read(info.name, start, stop):
                result.problems.append(("kept vs source", f"differs from the source (first difference in bytes "
                                        f"{start}-{stop})", info.name))
                return
    else:  # written as the BF16 dequantization
        rows, row_bytes = info.shape[0], out.nbytes // max(info.shape[0], 1)
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            if bytes(src.rows(r0, r1).view(torch.uint8).numpy()) != bytes(output.read(info.name, r0 * row_bytes,
                                                                                     r1 * row_bytes)):
                result.problems.append(("kept vs source", f"differs from the source's BF16 dequantization (first "
                                        f"difference in rows {r0}-{r1})", info.name))
                return
    result.identical += 1


def _compare_quantized(output: OutputTensors, module: str, src: SourceWeight, result: Comparison) -> None:
    info = src.info
    packed_info = output.tensors[f"{module}.weight"][1]
    if src.dtype not in FLOAT_DTYPES or len(info.shape) != 2 or info.shape[1] % BLOCK or \
            tuple(packed_info.shape) != (info.shape[0], info.shape[1] // 2):
        result.problems.append(("error vs source", f"packed {list(packed_info.shape)} does not match source "
                                f"{info.dtype}{list(info.shape)}", module))
        return
    n, k = info.shape
    scale = output.tensors.get(f"{module}.weight_scale")
    ws2_entry = output.tensors.get(f"{module}.weight_scale_2")
    if scale is None or scale[1].shape != (n, k // BLOCK) or ws2_entry is None or ws2_entry[1].nbytes != 4:
        return  # malformed, reported by the layout check
    ws2 = torch.frombuffer(output.read(f"{module}.weight_scale_2"), dtype=torch.float32).reshape(())
    signal = error = rtn_error = amax = 0.0
    worst, worst_at = 0, (0, 0)
    step = max(1, COMPARE_BYTES // (k * 4))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        raw = src.rows(r0, r1)
        w = raw.float()
        packed, scales = output.rows(f"{module}.weight", r0, r1), output.rows(f"{module}.weight_scale", r0, r1)
        rtn_error += float(((w - dequantize(*reference.quantize(raw, ws2), ws2)).double() ** 2).sum())
        signal += float((w.double() ** 2).sum())
        amax = max(amax, float(w.abs().max()) if w.numel() else 0.0)
        error += float(((w - dequantize(packed, scales, ws2)).double() ** 2).sum())
        distance = _code_distance(w, packed, scales, ws2)
        if int(distance.max()) > worst:
            worst, flat = int(distance.max()), int(distance.argmax())
            worst_at = (r0 + flat // k, flat % k)
    rel = math.sqrt(error / signal) if signal > 0 else (0.0 if error == 0 else math.inf)
    gain = 1.0 - error / rtn_error if rtn_error > 0 and math.isfinite(error) else 0.0
    layer = LayerError(module, (n, k), _sqnr(signal, error), rel, worst, dust=is_dust(amax), gain_vs_rtn=gain)
    if worst > 1:
        layer.outlier = (f"a code is {worst} E2M1 steps from the rounding of the source value "
                         f"(row {worst_at[0]}, column {worst_at[1]})")
    result.layers.append(layer)


def _sqnr(signal: float, error: float) -> float:
    if math.isnan(error) or math.isnan(signal):
        return math.nan
    if error == 0:
        return math.inf
    return 10 * math.log10(signal / error) if signal > 0 else -math.inf


def _code_distance(w: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, ws2: torch.Tensor) -> torch.Tensor:
    """Grid steps between each stored code and round-to-nearest of the source value with the stored scales.

    Correct quantization gives 0 (1 at a rounding tie for approximate kernels); a corrupted byte gives
    more. Unlike an error bound this holds for saturated and subnormal-scale blocks too.
    """
    unit = (scales.float() * ws2).repeat_interleave(BLOCK, dim=1)
    expected = cast_e2m1(torch.nan_to_num(w / unit, nan=0.0, posinf=6.0, neginf=-6.0))
    return (grid_position(unpack_codes(packed)) - grid_position(expected)).abs()
