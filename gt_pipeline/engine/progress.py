"""Progress lines for long steps: `done/total unit (pct) | rate | ETA`, throttled, into any `log(str)`.

No Dagster here: an asset passes `context.log.info` as `log`, so the lines land in the Dagster run log
(and on the CLI's stderr as they happen); the evaluation functions and `data`'s tokenization take the
plain `progress(done, total)` callback that a `Progress` object is.

    p = Progress("niah", total=48, log=context.log.info, unit="trials")
    for ...:
        p.advance()          # or p(done, total): absolute, the form data/ and evaluate.py call
    p.finish()               # the closing line if the last update did not reach total

A line is written when `every_s` seconds have passed since the previous one, and once when `done`
reaches `total` (that line ends with the elapsed time instead of the ETA). `finish()` writes that
closing line when the work ended short of `total` (e.g. work items that did not apply were skipped).
"""

from __future__ import annotations

import time
from typing import Callable


def format_duration(seconds: float) -> str:
    """12s, 1m05s, 2h03m (whole seconds; negative or non-finite -> '?')."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _number(n: float) -> str:
    return f"{n:,.0f}" if float(n).is_integer() or abs(n) >= 100 else f"{n:,.1f}"


def format_amount(n: float, unit: str) -> str:
    """Bytes in MB (1e6) with one decimal; anything else with thousands separators (one decimal below 100)."""
    if unit == "B":
        return f"{n / 1e6:,.1f} MB"
    return f"{_number(n)} {unit}".rstrip()


class Progress:
    """Throttled progress of one step with a known total (see the module docstring).

    Args:
        label: what is progressing ("tokenize", "niah", ...); starts every line.
        total: units of work (> 0).
        log: receives each line, e.g. `context.log.info` or `print`.
        unit: "B" (shown as MB), "steps", "trials", ...; rates are per second of wall clock.
        every_s: at most one line per this many seconds (besides the completion line).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, label: str, total: float, log: Callable[[str], None], *, unit: str = "",
                 every_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if not total > 0:
            raise ValueError(f"Progress({label!r}).total must be > 0, got {total!r}")
        if every_s < 0:
            raise ValueError(f"Progress({label!r}).every_s must be >= 0, got {every_s!r}")
        self.label, self.total, self.log, self.unit, self.every_s, self.clock = label, total, log, unit, every_s, clock
        self.done = 0.0
        self.t0 = clock()
        self._last_line = self.t0
        self._completed = False

    def __call__(self, done: float, total: float | None = None) -> None:
        """Absolute update: `done` units of `total` (a new total replaces the old one)."""
        if total is not None:
            if not total > 0:
                raise ValueError(f"Progress({self.label!r}): total must be > 0, got {total!r}")
            self.total = total
        self.done = min(done, self.total)
        now = self.clock()
        if self.done >= self.total and not self._completed:
            self._completed = True
            self._emit(now, closing=True)
        elif now - self._last_line >= self.every_s and not self._completed:
            self._emit(now)

    def advance(self, n: float = 1) -> None:
        self(self.done + n)

    def line(self, now: float | None = None, closing: bool = False) -> str:
        """The current line: 'label: done/total unit (pct%) | rate unit/s | ETA t' ('in <elapsed>' instead
        of the ETA once done reaches total, or when `closing`)."""
        now = self.clock() if now is None else now
        elapsed = now - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total
        if self.unit == "B":
            amount = f"{self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB"
        else:
            amount = f"{_number(self.done)}/{format_amount(self.total, self.unit)}"
        tail = f"in {format_duration(elapsed)}" if closing or self.done >= self.total else f"ETA {format_duration(eta)}"
        return f"{self.label}: {amount} ({pct:.0f}%) | {format_amount(rate, self.unit)}/s | {tail}"

    def finish(self) -> None:
        """Writes the closing line ('... in <elapsed>') unless `done` already reached `total` and wrote it."""
        if not self._completed:
            self._completed = True
            self._emit(self.clock(), closing=True)

    def _emit(self, now: float, closing: bool = False) -> None:
        self._last_line = now
        self.log(self.line(now, closing))
