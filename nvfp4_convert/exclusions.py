"""``exclude_modules`` as ModelOpt 0.47 writes it: prefix wildcards over whole unquantized subtrees.

Serving engines decide per *their* module, and some of theirs are containers: SGLang's and TensorRT-LLM's
FusedMoE look up ``model.layers.L.mlp.experts`` itself, which no per-expert leaf name matches. ModelOpt
therefore summarizes (``_prefix_wildcard_summarize_exclude_modules`` in ``modelopt/torch/export/
quant_utils.py``): for each unquantized module it takes the first of its ancestors ``A`` (outermost
first) such that no quantized module name starts with ``A``, and writes ``A*``; failing that, the first
ancestor with no quantized module at or below it, written ``A.*``; failing both, the exact name.
Multi-token-prediction layers are appended afterwards as ``prefix*`` (``_add_mtp_exclusions``).
"""

from __future__ import annotations

import fnmatch
import re
from bisect import bisect_left
from collections.abc import Iterable


class _Prefixes:
    """Answers "does some name start with this string?" in O(log n) from one sorted list."""

    def __init__(self, names: Iterable[str]):
        self._sorted = sorted(names)
        self._exact = set(self._sorted)

    def starts(self, prefix: str) -> bool:
        i = bisect_left(self._sorted, prefix)
        return i < len(self._sorted) and self._sorted[i].startswith(prefix)

    def exact(self, name: str) -> bool:
        return name in self._exact


def summarize(unquantized: Iterable[str], quantized: Iterable[str]) -> list[str]:
    """The sorted prefix-wildcard summary of ``unquantized`` that matches none of ``quantized``.

    Same result as ModelOpt's summarizer, in O(n log n) instead of a set of every prefix of every name.
    """
    q = _Prefixes(quantized)
    summary: set[str] = set()
    for name in unquantized:
        summary.add(_first_pattern(name, q))
    return sorted(summary)


def _first_pattern(name: str, q: _Prefixes) -> str:
    start = 0
    while (dot := name.find(".", start)) >= 0:
        ancestor = name[:dot]
        if not q.starts(ancestor):
            return ancestor + "*"
        if not q.exact(ancestor) and not q.starts(ancestor + "."):
            return ancestor + ".*"
        start = dot + 1
    return name


def mtp_prefixes(config: dict, modules: Iterable[str]) -> list[str]:
    """Multi-token-prediction layers (DeepSeek-V3/R1, Kimi-K2, GLM-4 MoE): ``model.layers.{n..}`` present here.

    They follow the decoder stack: ``num_nextn_predict_layers`` layers from ``num_hidden_layers`` on.
    """
    first = config.get("num_hidden_layers")
    count = config.get("num_nextn_predict_layers") or 0
    if not isinstance(first, int) or not isinstance(count, int) or count <= 0:
        return []
    modules = list(modules)
    prefixes = [f"model.layers.{first + i}" for i in range(count)]
    return [p for p in prefixes if any(m.startswith(p + ".") for m in modules)]


def exclude_list(unquantized: Iterable[str], quantized: Iterable[str], mtp: list[str]) -> list[str]:
    """``exclude_modules``: the summary, then ``prefix*`` for each wholly unquantized MTP layer of ``mtp``.

    As in ModelOpt's export, the MTP entries come last, after the sorted summary of everything else.
    """
    quantized = list(quantized)
    q = _Prefixes(quantized)
    mtp = [p for p in mtp if not q.starts(p + ".")]
    inside = tuple(p + "." for p in mtp)
    rest = [m for m in unquantized if not m.startswith(inside)] if inside else list(unquantized)
    return summarize(rest, quantized) + [f"{p}*" for p in mtp]


def vllm_forms(entry: str) -> tuple[str, ...]:
    """What vLLM's ``apply_vllm_mapper`` turns an entry into: ``X*`` (not ``X.*``) becomes ``X`` and ``X.*``."""
    if len(entry) >= 2 and entry.endswith("*") and entry[-2] != ".":
        return entry[:-1], entry[:-1] + ".*"
    return (entry,)


class Matcher:
    """Which names a list of exclusion patterns matches (``fnmatchcase``, as TensorRT-LLM tests them), fast.

    Exact entries are a set lookup and ``prefix*`` entries one ``str.startswith`` over all prefixes;
    only the rare other wildcards go through a regex. Checking n names is O(n), not O(n x patterns).
    """

    def __init__(self, patterns: Iterable[str]):
        self.patterns = list(patterns)
        self._exact = {p for p in self.patterns if not _WILD.search(p)}
        prefix = [p for p in self.patterns if p.endswith("*") and not _WILD.search(p[:-1])]
        self._prefixes = tuple(p[:-1] for p in prefix)
        other = [p for p in self.patterns if p not in self._exact and p not in prefix]
        self._regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in other)) if other else None

    def matches(self, name: str) -> bool:
        return name in self._exact or name.startswith(self._prefixes) or \
            (self._regex is not None and self._regex.match(name) is not None)

    def first(self, name: str) -> str | None:
        """The first pattern, in list order, that matches ``name``."""
        if not self.matches(name):
            return None
        return next(p for p in self.patterns if name == p or fnmatch.fnmatchcase(name, p))


_WILD = re.compile(r"[*?\[]")
