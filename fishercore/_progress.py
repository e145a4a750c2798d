"""A minimal progress bar on stderr, shown only on a terminal (no dependency)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, enabled, desc) as bar: bar.update(k)``."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "", stream=None):
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.enabled = bool(enabled) and isatty()
        self.total, self.desc, self.done = max(int(total), 1), desc, 0
        self.start = time.perf_counter()

    def update(self, k: int = 1) -> None:
        self.done += k
        if self.enabled:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(30 * frac)
            dt = time.perf_counter() - self.start
            self.stream.write(f"\r{self.desc} [{bar:<30}] {self.done}/{self.total} {dt:6.1f}s")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
        return False
