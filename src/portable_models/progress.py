"""The live view while converting: one line per target with its state and elapsed time,
redrawn in place on a terminal, one plain line per change elsewhere."""

from __future__ import annotations

import threading
import time
from typing import Any, TextIO

from portable_models.core.settings import no_color

__all__ = ["Progress"]


class Progress:
    """The live view while converting: one line per target (waiting / converting / running /
    pass / fail) with elapsed time. On a terminal the lines are redrawn in place every
    second; elsewhere (CI logs, pipes) one plain line per change. ``NO_COLOR`` is honoured."""

    def __init__(self, stream: TextIO, quiet: bool = False) -> None:
        self.stream, self.quiet = stream, quiet
        self.live = not quiet and hasattr(stream, "isatty") and stream.isatty()
        self.color = self.live and not no_color()
        self.rows: dict[str, list[Any]] = {}
        self.drawn = 0
        self.lock = threading.Lock()
        self.ticker: threading.Thread | None = None
        self.done = threading.Event()

    def __call__(self, key: str, state: str, detail: str) -> None:
        if self.quiet:
            return
        with self.lock:
            now = time.monotonic()
            row = self.rows.setdefault(key, [state, detail, None, None])
            if state in ("converting", "running") and row[2] is None:
                row[2] = now
            if state not in ("waiting", "converting", "running"):
                row[3] = now
            row[0], row[1] = state, detail
            if self.live:
                self._draw()
                if self.ticker is None:
                    self.ticker = threading.Thread(target=self._tick, daemon=True)
                    self.ticker.start()
            elif state != "waiting":
                print(self._line(key, row, now), file=self.stream, flush=True)

    def _line(self, key: str, row: list[Any], now: float) -> str:
        state, detail, started, ended = row
        elapsed = ((ended or now) - started) if started else 0.0
        text = f"{state:<11}"
        if self.color:
            code = {"pass": 32, "fail": 31, "error": 31, "unverified": 33}.get(state)
            text = f"\033[{code}m{text}\033[0m" if code else text
        extra = f"({detail})" if detail else ""
        return f"  {key:<14} {text} {extra:<26} {elapsed:6.1f} s"

    def _draw(self) -> None:
        now = time.monotonic()
        if self.drawn:
            self.stream.write(f"\033[{self.drawn}F")
        for key, row in self.rows.items():
            self.stream.write("\033[2K" + self._line(key, row, now) + "\n")
        self.drawn = len(self.rows)
        self.stream.flush()

    def _tick(self) -> None:
        while not self.done.wait(1.0):
            with self.lock:
                if any(r[0] in ("converting", "running") for r in self.rows.values()):
                    self._draw()

    def close(self) -> None:
        self.done.set()
