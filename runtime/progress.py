"""A small progress line on stderr with rate and ETA (conversion, calibration, evaluation)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, task: str, total: int, quiet: bool = False, stream=None):
        self.task, self.total, self.quiet = task, total, quiet
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
        if not self._tty and self.n < self.total and self.n % max(1, self.total // 20):
            return
        self._last = now
        el = now - self.t0
        eta = el / self.n * (self.total - self.n) if self.n else 0
        line = f"{self.task}: {self.n}/{self.total} [{el:.0f}s elapsed, ETA {eta:.0f}s] {what}"
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
