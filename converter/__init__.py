"""llmpack.converter — server side: checkpoint folder -> .llmpack (needs torch + transformers)."""
from .convert import convert

__all__ = ["convert"]
