"""Recipes: per-architecture data saying what to quantize, what to keep, and what to fuse.

Recipes are TOML files in the ``recipes/`` folder (shipped inside the package when installed). The
one whose ``model_types`` lists the checkpoint's ``config.json`` ``model_type`` is used, else
``default``; ``--recipe FILE`` replaces that choice and ``--exclude`` patterns are added to it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConvertError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class FuseRule:
    """Sibling modules (same parent) that read one input and so share their global scales."""

    members: tuple[str, ...]
    alias: str | None = None


@dataclass(frozen=True)
class Recipe:
    """What to quantize (fnmatch patterns over module names), what to exclude, and what to fuse.

    ``conv1d`` names modules stored as Hugging Face ``Conv1D`` (weight ``[in, out]``, transposed by engines at
    load): they stay high precision, since NVFP4 blocks must run along ``in``.
    """

    name: str
    quantize: tuple[str, ...]
    exclude: tuple[str, ...]
    fuse: tuple[FuseRule, ...]
    description: str = ""
    model_types: tuple[str, ...] = ()
    source: str = ""
    conv1d: tuple[str, ...] = ()
    extra_exclude: tuple[str, ...] = ()  # the user's --exclude patterns, kept apart to say who excluded what
    _compiled: dict = field(default_factory=dict, compare=False, repr=False)

    def matches(self, kind: str, module: str) -> bool:
        """Whether ``module`` matches one of the ``kind`` ("quantize", "exclude" or "conv1d") patterns."""
        regex = self._compiled.get(kind)
        if regex is None:
            patterns = self.exclude + self.extra_exclude if kind == "exclude" else getattr(self, kind)
            regex = re.compile("|".join(fnmatch.translate(p) for p in patterns) or "(?!)")
            self._compiled[kind] = regex
        return regex.match(module) is not None

    def exclusion(self, module: str) -> str | None:
        """Why the patterns keep ``module`` in high precision (naming who excluded it), or None."""
        if not self.matches("quantize", module):
            return f"not matched by recipe {self.name}'s quantize patterns"
        if not self.matches("exclude", module):
            return None
        for pattern in self.extra_exclude:
            if fnmatch.fnmatchcase(module, pattern):
                return f"--exclude {pattern!r}"
        pattern = next(p for p in self.exclude if fnmatch.fnmatchcase(module, p))
        return f"excluded by recipe {self.name} ({pattern!r})"

    def with_excludes(self, patterns: list[str]) -> Recipe:
        """This recipe with the user's ``--exclude`` patterns added."""
        return dataclasses.replace(self, extra_exclude=self.extra_exclude + tuple(patterns), _compiled={})

    def summary(self) -> dict:
        """A plain-data view (for fingerprints, reports and model cards)."""
        return {
            "name": self.name,
            "quantize": list(self.quantize),
            "exclude": list(self.exclude + self.extra_exclude),
            "fuse": [{"members": list(r.members), "alias": r.alias} for r in self.fuse],
            **({"conv1d": list(self.conv1d)} if self.conv1d else {}),
        }


def recipes_dir() -> Path:
    """Where the shipped recipes live: inside the package when installed, the repo root otherwise."""
    packaged = Path(__file__).with_name("recipes")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "recipes"


def _load_raw(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError("recipe file not found", where=str(path), fix="Give an existing .toml recipe") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConvertError(f"invalid recipe ({exc})", where=str(path), fix="Fix the TOML syntax") from None


def _resolve(path: Path, config: dict, seen: tuple[str, ...] = ()) -> Recipe:
    raw = _load_raw(path)
    where = str(path)
    unknown = set(raw) - {"name", "description", "model_types", "extends", "quantize", "exclude", "fuse",
                        "conv1d"}
    if unknown:
        raise ConvertError(f"unknown recipe keys {sorted(unknown)}", where=where,
                           fix="Allowed: name, description, model_types, extends, quantize, exclude, fuse, conv1d")
    base = None
    if raw.get("extends"):
        parent = recipes_dir() / f"{raw['extends']}.toml"
        if str(parent) in seen:
            raise ConvertError("recipe extends itself", where=where, fix="Remove the cycle")
        base = _resolve(parent, config, seen + (where,))

    def patterns(key: str) -> tuple[str, ...]:
        values = raw.get(key, [])
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConvertError(f"recipe key {key!r} must be a list of strings", where=where, fix="Fix the recipe")
        return tuple(_fill(v, config, where=where) for v in values)

    fuse = []
    for rule in raw.get("fuse", []):
        if not isinstance(rule, dict) or not isinstance(rule.get("members"), list) or len(rule["members"]) < 2:
            raise ConvertError("each [[fuse]] needs members = [two or more names]", where=where, fix="Fix the recipe")
        fuse.append(FuseRule(tuple(rule["members"]), rule.get("alias")))
    quantize = patterns("quantize") if "quantize" in raw else (base.quantize if base else ())
    return Recipe(
        name=raw.get("name", path.stem),
        quantize=quantize,
        exclude=(base.exclude if base else ()) + patterns("exclude"),
        fuse=(base.fuse if base else ()) + tuple(fuse),
        description=raw.get("description", ""),
        model_types=tuple(raw.get("model_types", [])),
        source=where,
        conv1d=(base.conv1d if base else ()) + patterns("conv1d"),
    )


def _fill(pattern: str, config: dict, *, where: str) -> str:
    """``pattern`` with each ``{key}`` replaced by config.json's value, which must be an integer or a string."""
    try:
        keys = [key for _, key, _, _ in string.Formatter().parse(pattern) if key is not None]
    except ValueError as exc:
        raise ConvertError(f"recipe pattern {pattern!r} is malformed ({exc})", where=where,
                           fix="Write placeholders as {key}, literal braces as {{ and }}") from None
    for key in keys:
        value = config.get(key) if key.isidentifier() else None
        if key not in config or not (isinstance(value, str) or type(value) is int):
            found = "missing from config.json" if key not in config else f"{json.dumps(value)[:40]} in config.json"
            raise ConvertError(f"recipe pattern {pattern!r} needs config value {key!r}, an integer or string "
                               f"({found})", where=where, fix="Use only {keys} config.json holds as integers or "
                               "strings, or fix config.json")
    return pattern.format(**{key: config[key] for key in keys})


def load_recipe(*, config: dict, recipe_file: Path | None = None, extra_excludes: list[str] | None = None) -> Recipe:
    """The recipe for a checkpoint whose ``config.json`` is ``config``.

    Args:
        config: the parsed ``config.json`` (its ``model_type`` picks the recipe; its values fill
            ``{placeholders}`` in patterns).
        recipe_file: a TOML file replacing the automatic choice (``--recipe``).
        extra_excludes: patterns added to the exclusions (``--exclude``).
    """
    if recipe_file is not None:
        recipe = _resolve(Path(recipe_file), config)
    else:
        model_type = config.get("model_type")
        chosen = recipes_dir() / "default.toml"
        for path in sorted(recipes_dir().glob("*.toml")):
            if model_type in _load_raw(path).get("model_types", []):
                chosen = path
                break
        recipe = _resolve(chosen, config)
    return recipe.with_excludes(list(extra_excludes or []))
