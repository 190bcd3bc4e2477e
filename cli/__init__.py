"""llmpack: one compact file per LLM, converted on a server, run on a CPU without torch."""
from llmpack.formats import __version__

__all__ = ["__version__"]
