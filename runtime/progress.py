"""A small progress line on stderr with rate and ETA (conversion, calibration, evaluation)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, task: str, total: int, quiet: bool = False, stream=None, unit: str | None = None,
                 scale: float = 1.0):
        """`unit`/`scale`: steps weighted by size (e.g. weights, shown in billions with scale=1e9),
        so the ETA follows the work, not the count of unequal steps."""
        self.task, self.total, self.quiet = task, total, quiet
        self.unit, self.scale = unit, scale
        self.stream = stream or sys.stderr
        self.n = 0
        self.t0 = time.time()
        self._last = 0.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, what: str = "", n: int = 1):
        self.n += n
        if self.quiet:
            return
        now = time.time()
        # On a terminal redraw at most 10x/s; in logs print about 20 lines per task.
        if self._tty and now - self._last < 0.1 and self.n < self.total:
            return
        if not self._tty and self.n < self.total and (20 * self.n) // max(self.total, 1) == \
                (20 * (self.n - n)) // max(self.total, 1):
            return  # in logs: a line each time another 5% is done
        self._last = now
        el = now - self.t0
        eta = el / self.n * (self.total - self.n) if self.n else 0
        count = f"{self.n}/{self.total}" if self.unit is None else \
            f"{self.n / self.scale:.2f}/{self.total / self.scale:.2f} {self.unit}"
        line = f"{self.task}: {count} [{el:.0f}s elapsed, ETA {eta:.0f}s] {what}"
        if self._tty:
            self.stream.write("\r\033[K" + line[:150])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self, message: str = ""):
        if self.quiet:
            return
        if self._tty:
            self.stream.write("\r\033[K")
        self.stream.write(f"{self.task}: done in {time.time() - self.t0:.1f}s {message}\n")
        self.stream.flush()
