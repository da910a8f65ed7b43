"""The verify report as text: the check table and the verdict printed by ``nvfp4-convert verify``."""

from __future__ import annotations

import math
import statistics

from .report import CHECKS, SOURCE_CHECKS, VerifyReport


def format_summary(report: VerifyReport) -> str:
    """The check table, what was checked, the error against the source (if compared) and the verdict."""
    failed = {c: sum(v.check == c for v in report.violations) for c in CHECKS}
    width = max(len(c) for c in CHECKS)
    lines = [f"{'check':<{width}}  {'checked':>7}  result"]
    for check in CHECKS:
        if check in SOURCE_CHECKS and report.source is None:
            continue
        result = f"FAIL ({failed[check]})" if failed[check] else "ok"
        lines.append(f"{check:<{width}}  {report.checked[check]:>7}  {result}")
    lines += ["", f"output:     {report.output}", f"format:     {report.quant_algo or '?'}; "
              f"{len(report.quantized)} quantized Linear weights in {len(report.groups)} scale groups, "
              f"{len(report.kept)} tensors kept"]
    if report.source is not None:
        lines.append(f"source:     {report.source}")
        if stats := report.sqnr_stats():
            measured = [x for x in report.layers if not math.isnan(x.sqnr_db)]
            worst = min(measured, key=lambda x: x.sqnr_db)
            lines.append(f"SQNR:       median {stats[0]:.1f} dB, min {stats[1]:.1f} dB ({worst.module}); "
                         f"max relative RMS error {max(x.rel_rms for x in measured):.4f}")
        gains = sorted(x.gain_vs_rtn for x in report.layers if not x.dust)
        if gains and any(gains):
            least = min((x for x in report.layers if not x.dust), key=lambda x: x.gain_vs_rtn)
            lines.append(f"vs rtn:     block scales remove {statistics.median(gains):.1%} of round-to-nearest's "
                         f"squared error (median per layer; least {gains[0]:.1%}, {least.module})")
        lines.append(f"kept:       {report.identical} of {len(report.kept)} tensors byte-identical to the source")
    verdict = "PASS" if report.ok else f"FAIL: {len(report.violations)} violation(s)"
    lines += [f"verdict:    {verdict} ({report.seconds:.1f} s)"]
    return "\n".join(lines)
