"""Plots of a :class:`~nvfp4_convert.verify.report.VerifyReport` (matplotlib is an optional extra).

Each ``plot_*`` function draws on a matplotlib ``Axes`` you pass (handy in notebooks);
:func:`save_plots` writes them all as PNG files. Figures are built without ``pyplot`` so the caller's
matplotlib backend is left alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import require_module
from ..kernels.common import E2M1_VALUES

if TYPE_CHECKING:
    from .activations import ActivationReport
    from .report import VerifyReport


def require_matplotlib() -> None:
    """Raise a one-line error when matplotlib is not installed."""
    require_module("matplotlib", purpose="plots", where="--plots", extra="plot")


def plot_sqnr(report: VerifyReport, ax) -> None:
    """SQNR (dB) of every quantized weight in checkpoint order; outliers in red."""
    layers = report.layers
    values = [x.sqnr_db if math.isfinite(x.sqnr_db) else 0.0 for x in layers]
    colors = ["tab:red" if x.outlier else "tab:blue" for x in layers]
    ax.bar(range(len(layers)), values, color=colors, width=0.8)
    if stats := report.sqnr_stats():
        ax.axhline(stats[0], color="gray", linestyle="--", linewidth=1, label=f"median {stats[0]:.1f} dB")
        ax.legend(loc="lower right", fontsize="small")
    ax.set_xlabel("quantized weight (checkpoint order)")
    ax.set_ylabel("SQNR vs source (dB)")
    ax.set_title("Per-layer quantization error")


def plot_sqnr_histogram(report: VerifyReport, ax) -> None:
    """Distribution of per-layer SQNR."""
    values = [x.sqnr_db for x in report.layers if math.isfinite(x.sqnr_db)]
    ax.hist(values, bins=min(30, max(5, len(values) // 2)), color="tab:blue")
    ax.set_xlabel("SQNR vs source (dB)")
    ax.set_ylabel("weights")
    ax.set_title("SQNR histogram")


def plot_codes(report: VerifyReport, ax) -> None:
    """How often each of the 16 E2M1 codes occurs over all packed weights."""
    labels = [f"{v:+g}" if i < 8 else f"-{abs(v):g}" for i, v in enumerate(E2M1_VALUES.tolist())]
    ax.bar(range(16), report.code_counts, color=["tab:green"] * 8 + ["tab:orange"] * 8)
    ax.set_xticks(range(16), labels, rotation=90, fontsize="small")
    ax.set_xlabel("E2M1 code value (green: +, orange: -)")
    ax.set_ylabel("elements")
    ax.set_title("E2M1 code histogram")


def plot_block_scales(report: VerifyReport, ax) -> None:
    """How often each FP8-E4M3 block-scale value occurs (log2 axis)."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().tolist()
    points = [(math.log2(v), c) for v, c in zip(values, report.scale_counts) if c and v > 0 and math.isfinite(v)]
    if points:
        xs, ys = zip(*points)
        ax.bar(xs, ys, width=0.1, color="tab:purple")
    ax.set_xlabel("log2(block scale)")
    ax.set_ylabel("blocks")
    ax.set_title("E4M3 block-scale histogram")


def plot_activation_errors(seen: ActivationReport, ax) -> None:
    """Each decoder layer's mean relative output error: W4A16, W4A4 with the stored and with 1.0 input_scales."""
    layers = seen.by_layer()
    labels = {"w4a16": "W4A16", "w4a4": "W4A4, stored input_scale", "w4a4_scale1": "W4A4, input_scale 1.0"}
    for setting, label in labels.items():
        values = [errs[setting] for errs in layers.values()]
        if any(v == v for v in values):  # a setting that applies (no W4A4 for a W4A16 checkpoint)
            ax.plot(range(len(values)), [v * 100 for v in values], marker=".", label=label)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative output error (RMS, %)")
    ax.set_title(f"Linear output error on {seen.samples} x {seen.seq_len} tokens")
    ax.legend(fontsize="small")


def save_activation_plots(seen: ActivationReport, folder: Path) -> list[Path]:
    """Write :func:`plot_activation_errors` as a PNG file in ``folder``; returns its path."""
    require_matplotlib()
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 3.5), layout="constrained")
    plot_activation_errors(seen, fig.add_subplot())
    path = folder / "activation_error_per_layer.png"
    fig.savefig(path, dpi=100)
    return [path]


def save_plots(report: VerifyReport, folder: Path) -> list[Path]:
    """Write the plots that apply to ``report`` as PNG files in ``folder``; returns their paths."""
    require_matplotlib()
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    plots = [("e2m1_codes.png", plot_codes), ("block_scales.png", plot_block_scales)]
    if report.layers:
        plots = [("sqnr_per_layer.png", plot_sqnr), ("sqnr_histogram.png", plot_sqnr_histogram), *plots]
    written = []
    for filename, draw in plots:
        fig = Figure(figsize=(7, 3.5), layout="constrained")
        draw(report, fig.add_subplot())
        fig.savefig(folder / filename, dpi=100)
        written.append(folder / filename)
    return written
