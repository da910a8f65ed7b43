"""nvfp4-convert: stream a Hugging Face checkpoint into a ModelOpt-format NVFP4 checkpoint."""

__version__ = "0.1.0"

from .converter import Report, convert  # noqa: E402
from .errors import ConvertError  # noqa: E402

__all__ = ["ConvertError", "Report", "__version__", "convert"]
