"""Log lines a person can follow, and progress that suits where the output goes.

A run's lines read `2026-11-27 22:10:03 selfalign: iter_000: generation 12.3 s` on stdout,
written by the main process only (accelerate's multi-process logger); errors stay one line
on stderr. `selfalign` (the CLI) installs the handler; a library user who wants the lines
calls `setup()` or configures the "selfalign" logger as usual.

Progress bars (tqdm) are drawn only when stderr is a terminal. Piped or redirected, a bar
becomes plain log lines, one every SELFALIGN_PROGRESS_EVERY seconds (default 30) while the
stage runs (a stage shorter than that prints none; its stage line follows): no carriage
returns in a log file. The clock runs on its own thread, so a stage whose single step takes
minutes (one generate() call, one judge call) still prints on time; of nested bars only the
innermost one prints.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

NAME = "selfalign"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (pytest's capture and redirections swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup(level: int = logging.INFO) -> None:
    """Send the "selfalign" logger's lines to stdout with a timestamp (once per process)."""
    base = logging.getLogger(NAME)
    base.setLevel(level)
    if not any(isinstance(h, _CurrentStdout) for h in base.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt=DATE_FORMAT))
        base.addHandler(handler)
    base.propagate = False


def info(message: str, *args: Any) -> None:
    """Log one line from the main process only (accelerate's logger, which tags the rank).

    Before the run sets up accelerate's process state (which joins the process group, a
    collective), the launcher's RANK decides instead: starting the state here, on one rank
    only, would put the ranks' collectives out of step."""
    from accelerate import PartialState
    from accelerate.logging import get_logger

    if PartialState._shared_state:
        get_logger(NAME).info(message, *args)
    elif int(os.environ.get("RANK", "0")) == 0:
        logging.getLogger(NAME).info("[RANK 0] " + message, *args)


def duration(seconds: float) -> str:
    """'42.1 s', '3 min 05 s', '2 h 04 min': what a person reads at a glance."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def is_terminal() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


def progress_interval() -> float:
    return float(os.environ.get("SELFALIGN_PROGRESS_EVERY", "30"))


def progress_bar(iterable: Iterable | None = None, total: int | None = None, desc: str = "", disable: bool = False,
             initial: int = 0, leave: bool = False, **kwargs: Any) -> Any:
    """tqdm's bar on a terminal; plain periodic log lines (PlainProgress) anywhere else."""
    if is_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=disable, initial=initial, leave=leave, **kwargs)
    return PlainProgress(iterable, total=total, desc=desc, disable=disable, initial=initial)


_open: list[weakref.ref] = []  # PlainProgress bars not yet finished, innermost last
_open_lock = threading.Lock()
_clock: threading.Thread | None = None


def _tick() -> None:
    """The clock thread: every interval, the innermost open bar prints its line if nothing printed it since."""
    while True:
        time.sleep(max(progress_interval() / 4, 0.01))
        with _open_lock:
            _open[:] = [r for r in _open if (b := r()) is not None and not b.finished]
            bar = _open[-1]() if _open else None
        if bar is not None:
            bar.beat(time.monotonic())
        del bar  # the clock holds no bar between ticks: an abandoned one is collected and leaves the list


class PlainProgress:
    """The part of tqdm's interface selfalign uses, reported as a log line every progress_interval() seconds.

    A bar is finished when closed, when it reaches its total, or when it is garbage collected (an exception
    unwound past it); until then the clock thread prints it on time between updates."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 disable: bool = False, initial: int = 0) -> None:
        self.iterable, self.desc, self.disable = iterable, desc, disable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.start_n = total, initial, initial
        self.start = self.last = time.monotonic()
        self.interval = progress_interval()
        self.postfix = ""
        self.closed = False
        if not disable and self.interval > 0:  # at 0 every update prints: no clock needed
            global _clock
            with _open_lock:
                _open.append(weakref.ref(self))
                if _clock is None:
                    _clock = threading.Thread(target=_tick, name="selfalign-progress", daemon=True)
                    _clock.start()

    @property
    def finished(self) -> bool:
        return self.closed or (self.total is not None and self.n >= self.total)

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.beat(time.monotonic())

    def beat(self, now: float) -> None:
        """Print the line if the interval has passed since the last one."""
        if not self.disable and not self.closed and now - self.last >= self.interval:
            self.last = now
            info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self.start
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{duration(elapsed)} elapsed")
        done = self.n - self.start_n
        if self.total and done > 0 and self.n < self.total:
            parts.append(f"~{duration(elapsed / done * (self.total - self.n))} left")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        self.closed = True
