"""Progress reporting: a tqdm bar in a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


class _LineProgress:
    """Prints "desc: done/total" lines at most every ``interval`` seconds (for logs and CI)."""

    def __init__(self, total: int, desc: str, interval: float = 5.0, stream=None):
        self.total, self.desc, self.interval = total, desc, interval
        self.stream = stream or sys.stderr
        self.done = 0
        self._last = 0.0
        self._start = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval or self.done >= self.total:
            self._last = now
            pct = 100.0 * self.done / self.total if self.total else 100.0
            print(f"{self.desc}: {self.done}/{self.total} ({pct:.0f}%, {now - self._start:.1f}s)", file=self.stream, flush=True)

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


@contextmanager
def progress_bar(total: int, desc: str) -> Iterator:
    """A progress object with ``update(n)``: tqdm on a TTY, plain lines otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, leave=False)
    else:
        bar = _LineProgress(total, desc)
    try:
        yield bar
    finally:
        bar.close()
