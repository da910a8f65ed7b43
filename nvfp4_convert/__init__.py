"""nvfp4-convert: stream a Hugging Face checkpoint into a ModelOpt-format NVFP4 checkpoint.

The public names below are imported on first use, so ``import nvfp4_convert`` (and ``nvfp4-convert
--help``) does not pay for torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY = {
    "convert": "converter",
    "Report": "report",
    "ConvertError": "errors",
}

__all__ = ["ConvertError", "Report", "__version__", "convert"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # static analysers and IDEs see the real imports
    from .converter import convert
    from .errors import ConvertError
    from .report import Report
