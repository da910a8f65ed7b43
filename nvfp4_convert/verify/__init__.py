"""Check an NVFP4 output folder against the ModelOpt format contract, and optionally against its source.

Structural checks need only the output (:mod:`.checks`): both config files, the index, every quantized
Linear's tensors, block-scale bytes, shared scales of fused groups, exclusions and MoE expert formats. With a
source (:mod:`.compare`), every quantized weight is dequantized and compared with the original (SQNR,
relative RMS, and each code against a fresh rounding of the source value), and every kept tensor must be
byte-identical. Tensors are read one row chunk at a time and source shards are acquired one at a time.
The findings are data (:mod:`.report`); :mod:`.summary` and :mod:`.plots` present them.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import ConvertError
from ..output import write_json_atomic
from .checks import OutputChecker
from .compare import compare_with_source
from .report import CHECKS, QUANT_ALGOS, VerifyReport, Violation

__all__ = ["CHECKS", "QUANT_ALGOS", "VerifyReport", "Violation", "verify"]


def verify(out: Path, *, source: str | None = None, revision: str | None = None, token: str | None = None,
           endpoint: str | None = None, json_path: Path | None = None, plot_dir: Path | None = None,
           progress: bool = True) -> VerifyReport:
    """Check the NVFP4 checkpoint in ``out``; optionally compare it with its source.

    Args:
        out: the converted checkpoint folder.
        source: the checkpoint it was converted from (local folder or Hub repo id); enables the error
            measurement and the byte-identity check of kept tensors.
        revision: Hub revision of ``source``.
        token: Hub token for a gated or private ``source`` (never recorded).
        endpoint: Hub endpoint URL.
        json_path: also write the report as JSON here.
        plot_dir: also write PNG plots here (needs matplotlib: ``pip install 'nvfp4-convert[plot]'``).
        progress: show a progress bar.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is False when any invariant is broken.

    Raises:
        ConvertError: when ``out`` is not a folder, the source cannot be read, or plotting is asked
            for without matplotlib.
    """
    started = time.perf_counter()
    out = Path(out)
    if not out.is_dir():
        raise ConvertError("output folder not found", where=str(out), fix="Give the folder a conversion wrote")
    if plot_dir is not None:
        from .plots import require_matplotlib

        require_matplotlib()
    checker = OutputChecker(out, progress=progress)
    checker.run()
    report = checker.report
    if source is not None:
        found = compare_with_source(checker, quantized=report.quantized, src=source, revision=revision, token=token,
                                    endpoint=endpoint, progress=progress)
        report.source, report.layers, report.identical = found.source, found.layers, found.identical
        report.checked["error vs source"], report.checked["kept vs source"] = len(found.layers), found.kept_compared
        for check, what, where in found.problems:
            report.add(check, what, where)
    report.seconds = time.perf_counter() - started
    if json_path is not None:
        write_json_atomic(Path(json_path), report.to_dict())
        report.written.append(Path(json_path))
    if plot_dir is not None:
        from .plots import save_plots

        report.written += save_plots(report, Path(plot_dir))
    return report
