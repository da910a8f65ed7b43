"""The one error type the converter raises for bad input: what went wrong, where, and what to do."""

from __future__ import annotations


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
