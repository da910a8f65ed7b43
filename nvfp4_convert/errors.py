"""The one error type the converter raises for bad input: what went wrong, where, and what to do."""

from __future__ import annotations

FIX_SHARD = "Re-download or re-export this shard"  # the fix for every damaged or truncated safetensors file


class ConvertError(Exception):
    """A problem with the input or the environment that the user can fix.

    The CLI prints it as a single line ``error: <what> (<where>). <fix>`` and exits non-zero.
    """

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        text = self.what
        if self.where:
            text += f" ({self.where})"
        if self.fix:
            text += f". {self.fix}"
        return text


def require_module(name: str, *, purpose: str, where: str, extra: str) -> None:
    """Raise a one-line error when the optional package ``name`` is not installed."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise ConvertError(f"{purpose} need {name}, which is not installed", where=where,
                           fix=f"pip install 'nvfp4-convert[{extra}]'")
