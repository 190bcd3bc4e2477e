"""llmpack.runtime — device side: load a .llmpack by mmap and run it with numpy (no torch)."""
from .model import Model, load

__all__ = ["Model", "load"]
