"""What a conversion did (:class:`Report`), and its plan tables and end-of-run summaries as text."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .configs import quant_algo

if TYPE_CHECKING:
    from .plan import Plan
    from .recipes import Recipe

_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")  # a layer or expert index: a dot-separated number


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
    scales: str = "rtn"  # how block scales were chosen (rtn, mse, mse-weighted)
    activation_policy: str = ""
    seconds: float = 0.0  # the whole call
    check_seconds: float = 0.0  # of which choosing and proving the backend
    skipped_shards: list[str] = field(default_factory=list)
    dry_run: bool = False
    calibration: dict | None = None  # dataset, samples, seq_len, method (None: data-free)

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
    """``1234567`` -> ``"1.23 MB"`` (decimal units, as file sizes are usually given)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def size_line(bytes_in: int, bytes_out: int, *, about: bool = False) -> str:
    """``"32.00 MB -> 9.10 MB (3.52x smaller)"``: the one wording of a conversion's size change."""
    return (f"{human_bytes(bytes_in)} -> {'about ' if about else ''}{human_bytes(bytes_out)} "
            f"({bytes_in / max(bytes_out, 1):.2f}x smaller)")


def _natural(name: str) -> tuple:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _fold(names: list[str], every: list[set[int]]) -> str:
    """One name for ``names`` (which differ only in their indices): an index all of them share stays, one
    that takes every value the pattern has becomes ``*``, any other becomes its list, e.g. ``[0-2,5]``.
    A pattern with a single member keeps its indices (``every`` is the set of values of each index over
    all the pattern's tensors)."""
    parts = _NUMBER.split(names[0])
    values = [sorted({int(_NUMBER.findall(n)[i]) for n in names}) for i in range(len(parts) - 1)]
    shown = [str(v[0]) if len(v) == 1 else "*" if set(v) == every[i] else f"[{_ranges(v)}]"
             for i, v in enumerate(values)]
    return "".join(p + (shown[i] if i < len(shown) else "") for i, p in enumerate(parts))


def _action(plan: Plan, name: str, fused: dict[str, int]) -> str:
    module = name[: -len(".weight")] if name.endswith(".weight") else None
    if module in plan.quantized:
        return "NVFP4" + (f" (fused x{fused[module]})" if fused.get(module, 1) > 1 else "")
    if module in plan.kept_reasons:
        return f"keep: {plan.kept_reasons[module]}"
    return "keep"


def plan_rows(plan: Plan) -> list[tuple[str, int, str, str]]:
    """``(tensors, count, shape dtype, action)`` rows, by layer and module.

    Tensors that differ only in layer or expert indices and are treated alike share a row, with those
    indices shown as ``*``; where some of them are treated differently (a per-layer exclusion), each row
    lists the indices it covers, e.g. ``model.layers.[0-2,5].mlp.down_proj.weight``.
    """
    fused = {m: len(g) for g in plan.groups for m in g}
    groups: dict[tuple[str, str], dict[str, list[str]]] = {}
    for name, t in plan.tensors.items():
        key = (_NUMBER.sub("*", name), f"{list(t.info.shape)} {t.info.dtype}")
        groups.setdefault(key, {}).setdefault(_action(plan, name, fused), []).append(name)
    rows = []
    for (_, shape), by_action in groups.items():
        members = [n for names in by_action.values() for n in names]
        indices = [_NUMBER.findall(n) for n in members]
        every = [{int(ix[i]) for ix in indices} for i in range(len(indices[0]))]
        for action, names in by_action.items():
            names.sort(key=_natural)
            rows.append((_natural(names[0]), _fold(names, every), len(names), shape, action))
    return [(label, count, shape, action) for _, label, count, shape, action in sorted(rows)]


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
        f"size:         {size_line(plan.bytes_in, plan.bytes_out, about=True)} in {len(plan.shards)} shard(s)",
        f"exclusions:   {len(plan.exclude_modules)} modules listed in exclude_modules/ignore",
    ]
    lines += [f"warning:      {w}" for w in plan.warnings]
    return "\n".join(lines)


def format_summary(report: Report) -> str:
    """The end-of-run summary."""
    plan = report.plan
    work = report.seconds - report.check_seconds  # the conversion itself, without the backend self-check
    rate = f"{human_bytes(plan.bytes_in / work)}/s of source" if work > 0 else "no time measured"
    check = f", after a {report.check_seconds:.1f} s backend self-check" if report.check_seconds else ""
    lines = [
        f"done in {report.seconds:.1f} s ({rate}{check})",
        f"  quantized:  {len(plan.quantized)} Linear weights ({len(plan.groups)} scale groups)",
        f"  kept:       {len(plan.tensors) - len(plan.quantized)} tensors unchanged",
        f"  size:       {size_line(plan.bytes_in, plan.bytes_out)}",
        f"  format:     {report.quant_algo} (ModelOpt layout)",
        f"  activations:{' ' if report.activation_policy else ''}{report.activation_policy}",
        f"  backend:    {report.backend} ({report.backend_reason})",
        f"  output:     {report.output}",
    ]
    if report.skipped_shards:
        lines.append(f"  resumed:    {len(report.skipped_shards)} finished shard(s) verified and kept")
    return "\n".join(lines)
