"""What :func:`~nvfp4_convert.verify.verify` found, as data: the checks, their violations, the error table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .compare import LayerError, sqnr_stats

QUANT_ALGOS = ("NVFP4", "W4A16_NVFP4")
CHECKS = ("config files", "index", "tensor layout", "scalars", "block scales", "fusion groups", "exclusions",
          "MoE experts", "error vs source", "kept vs source")
SOURCE_CHECKS = ("error vs source", "kept vs source")  # run only with a source to compare against


@dataclass(frozen=True)
class Violation:
    """One broken invariant: which check, what is wrong, and where."""

    check: str
    what: str
    where: str

    def line(self) -> str:
        return f"{self.what} ({self.where})"


@dataclass
class VerifyReport:
    """What :func:`verify` checked and found."""

    output: Path
    source: str | None = None
    quant_algo: str | None = None
    checked: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHECKS, 0))
    violations: list[Violation] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    groups: list[tuple[str, ...]] = field(default_factory=list)
    layers: list[LayerError] = field(default_factory=list)
    identical: int = 0  # kept tensors byte-identical to the source
    code_counts: list[int] = field(default_factory=lambda: [0] * 16)  # E2M1 codes 0..15 over all weights
    scale_counts: list[int] = field(default_factory=lambda: [0] * 256)  # block scales by E4M3 byte
    seconds: float = 0.0
    written: list[Path] = field(default_factory=list)  # the --json and --plots files

    @property
    def ok(self) -> bool:
        return not self.violations

    def add(self, check: str, what: str, where: str) -> None:
        self.violations.append(Violation(check, what, where))

    def sqnr_stats(self) -> tuple[float, float] | None:
        """``(median, min)`` SQNR in dB over compared layers, or None without a source comparison."""
        return sqnr_stats(self.layers)

    def format_summary(self) -> str:
        """The table printed at the end of ``nvfp4-convert verify``."""
        from .summary import format_summary

        return format_summary(self)

    def to_dict(self) -> dict:
        """Plain data for ``--json`` (non-finite numbers become null)."""

        def num(x: float) -> float | None:
            return round(x, 6) if math.isfinite(x) else None

        stats = self.sqnr_stats()
        return {
            "ok": self.ok,
            "output": str(self.output),
            "source": self.source,
            "quant_algo": self.quant_algo,
            "checks": [{"name": c, "checked": self.checked[c], "violations": sum(v.check == c for v in self.violations)}
                       for c in CHECKS],
            "violations": [{"check": v.check, "what": v.what, "where": v.where} for v in self.violations],
            "quantized_modules": len(self.quantized),
            "kept_tensors": len(self.kept),
            "fusion_groups": [list(g) for g in self.groups if len(g) > 1],
            "sqnr_db": {"median": num(stats[0]), "min": num(stats[1])} if stats else None,
            "kept_identical": self.identical if self.source is not None else None,
            "layers": [{"module": x.module, "shape": list(x.shape), "sqnr_db": num(x.sqnr_db),
                        "rel_rms": num(x.rel_rms), "max_code_distance": x.max_code_distance, "outlier": x.outlier,
                        "gain_vs_rtn": num(x.gain_vs_rtn)}
                       for x in self.layers],
            "e2m1_code_counts": self.code_counts,
            "block_scale_byte_counts": self.scale_counts,
            "seconds": round(self.seconds, 3),
        }
