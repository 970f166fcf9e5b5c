"""Progress of a snapshot save, verify or restore: a bar on a terminal, plain lines otherwise.

The pipeline reports stages (``stage``), bytes done within a stage (``advance``, callable from
worker threads) and the end (``finish``). :class:`NullProgress` reports nothing.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Protocol, TextIO


class ProgressSink(Protocol):
    def stage(self, name: str, total: int | None = None) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finish(self, message: str) -> None: ...


class NullProgress:
    def stage(self, name: str, total: int | None = None) -> None:
        return None

    def advance(self, nbytes: int) -> None:
        return None

    def finish(self, message: str) -> None:
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop always returns


class Progress:
    """Writes progress to ``stream`` (stderr by default); a redrawn bar when it is a terminal."""

    WIDTH = 30
    REDRAW_SECONDS = 0.1

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._lock = threading.Lock()
        self._name = ""
        self._total: int | None = None
        self._done = 0
        self._started = time.monotonic()
        self._stage_started = self._started
        self._last_draw = 0.0
        self._open_line = False

    def stage(self, name: str, total: int | None = None) -> None:
        with self._lock:
            self._end_stage()
            self._name, self._total, self._done = name, total, 0
            self._stage_started = time.monotonic()
            if self.tty:
                self._draw(force=True)
            else:
                size = f" ({human_bytes(total)})" if total else ""
                self._write(f"{name}{size}\n")

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            if self.tty:
                self._draw(force=False)

    def finish(self, message: str) -> None:
        with self._lock:
            self._end_stage()
            self._name = ""
            elapsed = time.monotonic() - self._started
            self._write(f"{message} ({elapsed:.1f} s)\n")

    def end(self) -> None:
        """Close an open bar line (after a failure), so the next message starts on its own."""
        with self._lock:
            self._end_stage()
            self._name = ""

    # -- drawing (lock held) ------------------------------------------------------------------

    def _end_stage(self) -> None:
        if not self._name:
            return
        if self.tty:
            self._draw(force=True)
            self._write("\n")
            self._open_line = False

    def _draw(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < self.REDRAW_SECONDS:
            return
        self._last_draw = now
        elapsed = max(now - self._stage_started, 1e-6)
        rate = f"{human_bytes(self._done / elapsed)}/s" if self._done else ""
        if self._total:
            frac = min(self._done / self._total, 1.0)
            filled = int(frac * self.WIDTH)
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            text = (f"{self._name:<10} [{bar}] {frac * 100:5.1f}% "
                    f"{human_bytes(self._done)}/{human_bytes(self._total)} {rate}")
        else:
            text = f"{self._name:<10} {human_bytes(self._done) if self._done else ''} {rate}"
        self._write("\r" + text.rstrip() + "\x1b[K")
        self._open_line = True

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken terminal must not fail the snapshot
