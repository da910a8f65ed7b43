"""The conversion: plan from headers, then stream source shards through a quantize backend into
output shards, resumably."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import __version__, calibration, pipeline
from .config_fields import read_model_config
from .configs import hf_quant_config, quantized_model_config, safetensors_index
from .errors import ConvertError
from .importance import ChannelWeights, DataFreeProxy
from .kernels import Backend
from .kernels.search import SCALE_MODES
from .output import STATE_DIR, OutputDir, copy_atomic, write_json_atomic
from .plan import Plan, build_plan, check_not_quantized
from .publish import MODEL_CARD, card_license
from .recipes import Recipe, load_recipe
from .report import Report
from .safetensors_io import TORCH_DTYPES
from .sources import Source, open_source
from .sources.base import PICKLE_SUFFIXES, SAFETENSORS_INDEX

_NOT_COPIED_SUFFIXES = (".safetensors", ".gguf", ".onnx", ".h5", ".msgpack", ".partial", *PICKLE_SUFFIXES)
_REWRITTEN = {"config.json", "hf_quant_config.json", SAFETENSORS_INDEX}


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"100KB"`` or a byte count -> bytes (decimal units, as transformers)."""
    if isinstance(text, int):
        return text
    units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "TIB": 2**40, "GIB": 2**30, "MIB": 2**20,
             "KIB": 2**10, "B": 1}
    raw = text.strip().upper()
    for unit, factor in units.items():
        if raw.endswith(unit) and raw[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(raw[: -len(unit)]) * factor)
    if raw.isdigit():
        return int(raw)
    raise ConvertError(f"cannot read size {text!r}", where="--max-shard-size", fix="Use e.g. 5GB, 500MB or 100KB")


def activation_policy(weight_only: bool, calibration: dict | None = None) -> str:
    if weight_only:
        return "weight-only (W4A16_NVFP4): no input_scale; activations stay 16-bit"
    if calibration:
        amax = f"{calibration['headroom']:g} * max|x|" if calibration.get("headroom", 1.0) != 1.0 else "max|x|"
        return (f"W4A4 (NVFP4), calibrated: input_scale = {amax} / (6 * 448) per fused group, from "
                f"{calibration['samples']} x {calibration['seq_len']} tokens of {calibration['dataset']}")
    return "W4A4 (NVFP4), data-free: input_scale = 1.0 for every quantized Linear (no calibration)"


def convert(
    src: str,
    out: Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    work_dir: Path | None = None,
    keep_source: bool = False,
    recipe_file: Path | None = None,
    excludes: list[str] | None = None,
    weight_only: bool = False,
    max_shard_size: str | int = "5GB",
    backend: str | None = None,
    exact: bool = False,
    threads: int | None = None,
    scales: str = "rtn",
    channel_weights: ChannelWeights | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    calibrate: str | None = None,
    calib_samples: int = calibration.SAMPLES,
    calib_seq_len: int = calibration.SEQ_LEN,
    calib_column: str | None = None,
    calib_split: str | None = None,
    calib_headroom: float = 1.0,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> Report:
    """Convert a Hugging Face checkpoint to a ModelOpt-format NVFP4 checkpoint.

    Args:
        src: a local folder or a Hub repo id.
        out: the output folder (created; resumed when it holds an unfinished run of the same command).
        revision: Hub branch, tag or commit (resolved to a commit once).
        token: Hub token for gated or private repos (else ``HF_TOKEN``); never written anywhere.
        endpoint: Hub endpoint URL (tests and mirrors).
        work_dir: where Hub shards are downloaded one at a time (default: a temporary folder).
        keep_source: keep downloaded shards instead of deleting each once used.
        recipe_file: a TOML recipe replacing the one chosen by ``model_type``.
        excludes: extra fnmatch patterns of modules to keep in high precision.
        weight_only: write W4A16_NVFP4 (no ``input_scale``) instead of W4A4 NVFP4.
        max_shard_size: output shard size limit, e.g. ``"5GB"``.
        backend: force a quantize backend by name (default: the fastest that proves itself here).
        exact: only accept backends bit-exact with ModelOpt.
        threads: CPU threads for CPU backends (default: all cores).
        scales: how block scales are chosen: ``"rtn"`` (from each block's max, ModelOpt's default),
            ``"mse"`` (least squared error over every E4M3 scale, bit-exact with ModelOpt 0.47's MSE weight
            calibration export) or ``"mse-weighted"`` (least error weighted per input channel).
        channel_weights: where ``mse-weighted`` gets its per-input-channel weights (default: the calibrated
            E[x_k^2] with ``calibrate``, else the data-free proxy :class:`~nvfp4_convert.importance.DataFreeProxy`).
        dry_run: plan only; write nothing.
        overwrite: replace a previous conversion in ``out`` (only the files it wrote, once the new one is
            complete) and write next to files no conversion wrote (they are kept).
        progress: show progress bars.
        calibrate: calibration text (a .txt/.jsonl/.parquet file or a Hub dataset id): real ``input_scale``s
            from activation statistics collected one decoder layer at a time (default: data-free).
        calib_samples, calib_seq_len: how many samples of how many tokens to calibrate on.
        calib_column, calib_split: the text column (default ``text``) and Hub split (default ``train``).
        calib_headroom: factor on each calibrated max|x| before ``input_scale = max / (6 * 448)``; 1.0 (the
            default) is ModelOpt's value, byte for byte.
        command: the command line that asked for this (recorded for the model card; must hold no token).
        log: where human-readable lines go.

    Returns:
        A :class:`Report`.

    Raises:
        ConvertError: for bad input, with what went wrong, where, and what to do.
    """
    started = time.perf_counter()
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 4096):
        raise ConvertError(f"--threads must be a whole number from 1 to 4096, not {threads!r}", where="--threads",
                           fix="Pass a positive thread count, or leave it out to use every core")
    if scales not in SCALE_MODES:
        raise ConvertError(f"unknown block-scale mode {scales!r}", where="--scales",
                           fix=f"Use one of: {', '.join(SCALE_MODES)}")
    if not (isinstance(calib_headroom, int | float) and math.isfinite(calib_headroom) and 0 < calib_headroom <= 64):
        raise ConvertError(f"--calib-headroom must be a number above 0 and at most 64, not {calib_headroom!r}",
                           where="--calib-headroom", fix="Use 1.0 (ModelOpt's value) or e.g. 1.5")
    source = open_source(src, revision=revision, token=token, endpoint=endpoint, work_dir=work_dir,
                         keep_source=keep_source)
    output = None
    try:
        check_apart(source, Path(out))
        config = _read_config(source)
        recipe = load_recipe(config=config, recipe_file=recipe_file, extra_excludes=excludes)
        shard_size = parse_size(max_shard_size)
        plan = build_plan(config=config, headers=source.headers(), weight_map=getattr(source, "weight_map", None),
                          recipe=recipe, weight_only=weight_only, max_shard_size=shard_size,
                          where=source.description)
        report = Report(source=source.description, output=Path(out), plan=plan, recipe=recipe,
                        activation_policy=activation_policy(weight_only), dry_run=dry_run)
        if plan.fp8_flavour:
            log(f"source: {plan.fp8_flavour}; FP8 weights are dequantized to BF16, then quantized or kept")
        for warning in plan.warnings:
            log(f"warning: {warning}")
        data = None
        if calibrate:
            data = _calibration_data(source, calibrate, samples=calib_samples, seq_len=calib_seq_len,
                                     column=calib_column, split=calib_split, endpoint=endpoint, token=token)
            report.calibration = calibration_info(data, headroom=calib_headroom)
            if scales == "mse-weighted" and channel_weights is None:
                report.calibration["block_scales"] = "least error weighted by each input channel's calibrated E[x^2]"
            report.activation_policy = activation_policy(weight_only, report.calibration)
        if dry_run:
            return report
        if scales == "mse-weighted" and channel_weights is None and data is None:
            channel_weights = DataFreeProxy(config, set(plan.tensors))  # with --calibrate: the measured E[x^2]
        if data is None and not Path(out).exists():
            # a fresh run reads every shard: the first one downloads while the backends are checked
            first = pipeline.first_source_shard(plan=plan, shards=plan.shards, scales=scales,
                                                channel_weights=channel_weights)
            if first is not None:
                source.prefetch(first)
        dtypes = tuple({TORCH_DTYPES[plan.compute_dtype(t.name)] for t in plan.quantized.values()}) or None
        checking = time.perf_counter()
        chosen, reason = _choose_backend(backend, exact=exact, threads=threads, dtypes=dtypes, scales=scales)
        report.check_seconds = time.perf_counter() - checking
        report.backend, report.backend_reason, report.scales = chosen.name, reason, scales
        fingerprint = _fingerprint(source, recipe, plan, chosen, weight_only, shard_size, scales=scales,
                                   calibration=_calibration_key(data, calib_headroom))
        copied = _copied_files(source)
        files = [*(s.filename for s in plan.shards), *copied, *sorted(_REWRITTEN)]
        output = OutputDir(Path(out), fingerprint=fingerprint, files=files, sources=_shard_sources(source, plan),
                           overwrite=overwrite, log=log)
        _write_shards(source, plan, output, chosen, report, progress=progress, config=config, data=data, log=log,
                      scales=scales, channel_weights=channel_weights, headroom=calib_headroom)
        for name in copied:
            copy_atomic(source.fetch_file(name), output.path / name)
        _write_final_files(config, plan, output.path)
        report.seconds = time.perf_counter() - started
        info = conversion_info(report, source_revision=source.revision, command=command)
        output.mark_complete({**info, "license": _source_license(source)})
        return report
    finally:
        if output is not None:
            output.close()
        source.close()


def conversion_info(report: Report, *, source_revision: str | None, command: str | None) -> dict:
    """Plain-data facts about a finished conversion (kept with the output for model cards)."""
    plan = report.plan
    return {
        "tool": f"nvfp4-convert {__version__}",
        "source": report.source,
        "source_revision": source_revision,
        "command": command,
        "recipe": report.recipe.summary(),
        "quant_algo": report.quant_algo,
        "activation_policy": report.activation_policy,
        "backend": report.backend,
        "scales": report.scales,
        "quantized_modules": len(plan.quantized),
        "kept_tensors": len(plan.tensors) - len(plan.quantized),
        "exclude_modules": plan.exclude_modules,
        "bytes_in": plan.bytes_in,
        "bytes_out": plan.bytes_out,
        "calibration": report.calibration,
    }


def _read_config(source: Source) -> dict:
    config = read_model_config(source)
    check_not_quantized(config, {}, where=source.description)
    return config


def _choose_backend(name: str | None, *, exact: bool, threads: int | None,
                    dtypes: tuple[torch.dtype, ...] | None, scales: str = "rtn") -> tuple[Backend, str]:
    from .kernels import selfcheck

    if threads:
        torch.set_num_threads(threads)
    try:
        backend, reason = selfcheck.select_proven_backend(name, exact=exact, dtypes=dtypes, scales=scales)
    except (KeyError, RuntimeError) as exc:
        raise ConvertError(str(exc).strip("'\""), where="--backend",
                           fix="Run `nvfp4-convert bench` to list backends") from None
    if threads and backend.set_threads:
        backend.set_threads(threads)
    return backend, reason


def _fingerprint(source: Source, recipe: Recipe, plan: Plan, backend: Backend, weight_only: bool,
                 shard_size: int, *, scales: str = "rtn", calibration: str | None = None) -> str:
    import hashlib
    import json

    doc = {
        "tool": __version__,
        "source": source.fingerprint(),
        "recipe": recipe.summary(),
        "weight_only": weight_only,
        "max_shard_size": shard_size,
        "numerics": "exact" if backend.exact else backend.name,
    }
    if scales != "rtn":  # absent for rtn, so outputs of earlier versions still resume
        doc["scales"] = scales
    if calibration is not None:
        doc["calibration"] = calibration  # sha256 of the calibration token ids
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _write_shards(source: Source, plan: Plan, output: OutputDir, backend: Backend, report: Report, *,
                  progress: bool, config: dict, data=None, log: Callable[[str], None] = print,
                  scales: str = "rtn", channel_weights: ChannelWeights | None = None, headroom: float = 1.0) -> None:
    todo = []
    for shard in plan.shards:
        if output.finished(shard.filename):
            report.skipped_shards.append(shard.filename)
        else:
            todo.append(shard)
    weighted = scales == "mse-weighted" and channel_weights is None
    calibrated = data is not None and todo and (weighted or not plan.weight_only)
    if not calibrated:
        pipeline.run(source=source, plan=plan, output=output, shards=todo, backend=backend, progress=progress,
                     scales=scales, channel_weights=channel_weights)
        return
    from .calibration.collect import LayerCalibration
    from .calibration.values import CalibratedValues
    from .sources.shared import SharedShards

    # Each layer's modules are converted right after the layer is calibrated, from the shards calibration
    # read: held until both have read them, each shard is acquired (downloaded) once.
    shared = SharedShards(source)
    calibration = LayerCalibration(source=shared.view("calibration"), plan=plan, config=config, data=data,
                                   state_dir=output.path / STATE_DIR / "calibration", state_key=output.fingerprint,
                                   progress=progress, log=log)
    values = CalibratedValues(calibration, plan, headroom=headroom)
    if weighted:  # activation-aware block scales: the error weighted by each input channel's E[x^2]
        channel_weights = values
    shared.claim("calibration", calibration.will_read)
    shared.claim("conversion", pipeline.shards_read(plan, todo, channel_weights if scales == "mse-weighted" else None))
    try:
        pipeline.run(source=shared.view("conversion"), plan=plan, output=output, shards=todo, backend=backend,
                     progress=progress, input_scales=None if plan.weight_only else values, scales=scales,
                     channel_weights=channel_weights)
    finally:
        calibration.close()
        shared.finish("calibration")
    values.report(log, input_scales=not plan.weight_only)


def _calibration_data(source: Source, dataset: str, *, samples: int, seq_len: int, column: str | None,
                      split: str | None, endpoint: str | None, token: str | None):
    from .calibration.data import load_calibration_data, load_tokenizer
    from .calibration.layers import build_skeleton

    build_skeleton(read_model_config(source), dtype=torch.bfloat16, where=source.description)  # fail early
    tokenizer = load_tokenizer(source, where=source.description)
    return load_calibration_data(dataset, tokenizer=tokenizer, samples=samples, seq_len=seq_len, column=column,
                                 split=split, endpoint=endpoint, token=token)


def calibration_info(data, *, headroom: float = 1.0) -> dict:
    """What the model card says about calibration."""
    info = {"dataset": data.dataset, "split": data.split, "column": data.column, "samples": data.samples,
            "seq_len": data.seq_len, "method": calibration.METHOD}
    if headroom != 1.0:
        info["headroom"] = headroom
        info["method"] += f", with max|x| multiplied by {headroom:g} (headroom)"
    return info


def _calibration_key(data, headroom: float) -> str | None:
    """What of the calibration the output depends on: the token ids' sha256 (and a headroom other than 1)."""
    if data is None:
        return None
    return data.fingerprint() if headroom == 1.0 else f"{data.fingerprint()}:headroom={headroom!r}"


def _copied_files(source: Source) -> list[str]:
    """The source's non-weight files that go into the output as they are (tokenizer, license, ...).

    Not its model card: that describes the source model; ``push`` writes the checkpoint's own.
    """
    return [name for name in source.files
            if name not in _REWRITTEN and name != MODEL_CARD and not name.endswith(_NOT_COPIED_SUFFIXES)
            and not name.startswith(STATE_DIR)]


def _source_license(source: Source) -> dict[str, str]:
    """The license fields of the source's model card, for the checkpoint's own card."""
    return card_license(source.fetch_file(MODEL_CARD).read_text(encoding="utf-8", errors="replace")) \
        if MODEL_CARD in source.files else {}


def _shard_sources(source: Source, plan: Plan) -> dict[str, dict[str, str]]:
    """For each output shard, the fingerprint of every source shard it is made from."""
    prints = source.shard_fingerprints()
    return {shard.filename: {s: prints[s] for s in sorted(set().union(*(u.sources for u in shard.units)))}
            for shard in plan.shards}


def check_apart(source: Source, out: Path) -> None:
    """Refuse an output folder that is, holds, or lies inside the source or its download folder, links followed."""
    target = out.expanduser().resolve()
    roots = [r.resolve() for r in source.local_roots()]
    for root in roots:
        if target == root or root.is_relative_to(target) or target.is_relative_to(root):
            how = "is" if target == root else "holds" if root.is_relative_to(target) else "is inside"
            raise ConvertError(f"the output folder {how} the source folder {root}", where=str(out),
                               fix="Choose an output folder outside the source (and not containing it)")
    for name in source.local_files():
        real = name.resolve()
        if real.is_relative_to(target):
            raise ConvertError(f"the output folder holds the source file {real} (through a link)", where=str(out),
                               fix="Choose an output folder outside the source (and not containing it)")


def _write_final_files(config: dict, plan: Plan, out: Path) -> None:
    weight_map = {t.name: shard.filename for shard in plan.shards for t in shard.tensors}
    total = sum(t.nbytes for shard in plan.shards for t in shard.tensors)
    write_json_atomic(out / SAFETENSORS_INDEX, safetensors_index(weight_map=weight_map, total_size=total))
    write_json_atomic(out / "hf_quant_config.json",
                      hf_quant_config(exclude_modules=plan.exclude_modules, weight_only=plan.weight_only), indent=4)
    write_json_atomic(out / "config.json",
                      quantized_model_config(config, exclude_modules=plan.exclude_modules,
                                             weight_only=plan.weight_only))
