"""KV-cache prefix reuse: keep one cache and re-use the longest token prefix a new prompt shares
with what the cache holds (chat turns and the server's requests of one conversation)."""
from __future__ import annotations


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def cache_consistent(cache) -> bool:
    """False when a forward pass was interrupted while the cache grew (then it must be rebuilt)."""
    stores = getattr(cache, "k", None)
    if not isinstance(stores, list):
        return True  # another backend's cache: trust it
    shapes = {a.shape[1] for a in cache.k + cache.v}
    return len(shapes) <= 1 and cache.length <= min(shapes, default=cache.length)


class PrefixCache:
    """One backend KV cache plus the token ids it holds."""

    def __init__(self, backend):
        self.backend = backend
        self.cache = backend.new_cache()
        self.cached: list[int] = []

    def prepare(self, ids: list[int]) -> int:
        """Keep the cached prefix `ids` starts with (at least one token is left to run, to give the
        next-token logits); returns how many tokens are re-used."""
        reuse = max(0, min(common_prefix(self.cached, ids), len(ids) - 1))
        self.cache.truncate(reuse)
        self.cached = self.cached[:reuse]
        return reuse

    def commit(self, ids: list[int], generated: list[int]):
        """Record what the cache holds after a generation over `ids` that produced `generated`."""
        if cache_consistent(self.cache):
            self.cached = (list(ids) + list(generated))[:self.cache.length]
        else:
            self.cache, self.cached = self.backend.new_cache(), []
