"""llmpack.formats — the single-file format spec, its reader and its writer."""
__version__ = "0.2.0"

from .errors import FormatError, LlmpackError
from .reader import Pack
from .spec import FORMAT_VERSION, STORAGE_TYPES

__all__ = ["__version__", "FormatError", "LlmpackError", "Pack", "FORMAT_VERSION", "STORAGE_TYPES"]
