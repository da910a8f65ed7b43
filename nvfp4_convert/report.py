"""What a conversion did (:class:`Report`), and its plan tables and end-of-run summaries as text."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .configs import quant_algo

if TYPE_CHECKING:
    from .plan import Plan
    from .recipes import Recipe

_INDEX = re.compile(r"\.\d+\.")


@dataclass
class Report:
    """What a conversion did (or, with ``dry_run``, would do).

    ``print(report.format_summary())`` (or ``format_plan()`` for a dry run) gives what the CLI prints.
    """

    source: str
    output: Path
    plan: Plan = field(repr=False)
    recipe: Recipe = field(repr=False)
    backend: str = ""
    backend_reason: str = ""
    activation_policy: str = ""
    seconds: float = 0.0
    skipped_shards: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def quant_algo(self) -> str:
        return quant_algo(self.plan.weight_only)

    def __repr__(self) -> str:
        plan = self.plan
        what = "would convert" if self.dry_run else "converted"
        return (f"<Report: {what} {self.source} -> {self.output}; {len(plan.quantized)} NVFP4 weights, "
                f"{len(plan.tensors) - len(plan.quantized)} tensors kept, {len(plan.shards)} shard(s)"
                + (f", backend {self.backend}, {self.seconds:.1f} s" if not self.dry_run else "") + ">")

    def format_plan(self) -> str:
        """The ``--dry-run`` table and totals."""
        return format_plan(self)

    def format_summary(self) -> str:
        """The end-of-run summary."""
        return format_summary(self)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _pattern(name: str) -> str:
    while _INDEX.search(name):
        name = _INDEX.sub(".*.", name)
    return name


def plan_rows(plan: Plan) -> list[tuple[str, int, str, str]]:
    """``(pattern, count, shape dtype, action)`` rows with layer/expert indices folded into ``*``."""
    fused = {m: len(g) for g in plan.groups for m in g}
    rows: Counter = Counter()
    for name, t in plan.tensors.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        shape = f"{list(t.info.shape)} {t.info.dtype}"
        if module in plan.quantized:
            action = "NVFP4" + (f" (fused x{fused[module]})" if fused.get(module, 1) > 1 else "")
        elif module in plan.kept_reasons:
            action = f"keep: {plan.kept_reasons[module]}"
        else:
            action = "keep"
        rows[(_pattern(name), shape, action)] += 1
    return [(p, n, s, a) for (p, s, a), n in rows.items()]


def format_plan(report: Report) -> str:
    """The ``--dry-run`` table plus totals."""
    plan = report.plan
    rows = plan_rows(plan)
    width = max(len(r[0]) for r in rows) if rows else 10
    swidth = max(len(r[2]) for r in rows) if rows else 10
    lines = [f"{'tensor':<{width}}  {'count':>5}  {'shape dtype':<{swidth}}  action"]
    lines += [f"{p:<{width}}  {n:>5}  {s:<{swidth}}  {a}" for p, n, s, a in rows]
    kept = len(plan.tensors) - len(plan.quantized)
    lines += [
        "",
        f"source:       {report.source}",
        f"recipe:       {report.recipe.name} ({report.recipe.source})",
        f"quantize:     {len(plan.quantized)} Linear weights in {len(plan.groups)} scale groups; keep {kept} tensors",
        f"format:       {report.quant_algo}; {report.activation_policy}",
        f"size:         {human_bytes(plan.bytes_in)} in -> about {human_bytes(plan.bytes_out)} out "
        f"({plan.bytes_out / max(plan.bytes_in, 1):.2f}x) in {len(plan.shards)} shard(s)",
        f"exclusions:   {len(plan.exclude_modules)} modules listed in exclude_modules/ignore",
    ]
    lines += [f"warning:      {w}" for w in plan.warnings]
    return "\n".join(lines)


def format_summary(report: Report) -> str:
    """The end-of-run summary."""
    plan = report.plan
    rate = plan.bytes_in / report.seconds / 1e9 if report.seconds else 0.0
    lines = [
        f"done in {report.seconds:.1f} s ({rate:.2f} GB/s of source)",
        f"  quantized:  {len(plan.quantized)} Linear weights ({len(plan.groups)} scale groups)",
        f"  kept:       {len(plan.tensors) - len(plan.quantized)} tensors unchanged",
        f"  size:       {human_bytes(plan.bytes_in)} -> {human_bytes(plan.bytes_out)} "
        f"({plan.bytes_in / max(plan.bytes_out, 1):.2f}x smaller)",
        f"  format:     {report.quant_algo} (ModelOpt layout)",
        f"  activations:{' ' if report.activation_policy else ''}{report.activation_policy}",
        f"  backend:    {report.backend} ({report.backend_reason})",
        f"  output:     {report.output}",
    ]
    if report.skipped_shards:
        lines.append(f"  resumed:    {len(report.skipped_shards)} finished shard(s) verified and kept")
    return "\n".join(lines)
