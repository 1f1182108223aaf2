"""Fault injection for the reliability tests: die after the Nth durable write, or poison a loss.

These hooks are inert unless their environment variable is set; they exist so that tests can
kill a run at every point where its state on disk changes, which timers and polling cannot
reach reliably.

    SELFALIGN_KILL_AFTER_WRITE=N   SIGKILL this process right after its Nth durable write (an
                                   atomic replace, a journal line fsynced, a policy directory
                                   renamed into place). Counted per process.
    SELFALIGN_KILL_BEFORE_RENAME=1 with the above: die after write N's temporary is complete but
                                   before it is renamed over the real file (leaves a *.tmp); a
                                   journal line has no temporary and dies after the write.
    SELFALIGN_WRITE_LOG=FILE       append "N<TAB>path" for every durable write (tests pick kill points).
    SELFALIGN_NAN_AT_STEP=S        make the loss of optimizer step S (1-based, counted over the
                                   whole update) NaN, as a diverging run would.
"""

from __future__ import annotations

import os
import signal

_count = 0
_pid = -1


def writes_so_far() -> int:
    """Durable writes this process has made so far (a forked child starts again from 0)."""
    global _count, _pid
    if _pid != os.getpid():
        _count, _pid = 0, os.getpid()
    return _count


def _target() -> int:
    value = os.environ.get("SELFALIGN_KILL_AFTER_WRITE", "")
    return int(value) if value.strip() else 0


def before_rename() -> None:
    """Call when a write's temporary is complete, just before it replaces the real file."""
    target = _target()
    if target and os.environ.get("SELFALIGN_KILL_BEFORE_RENAME") and writes_so_far() + 1 == target:
        os.kill(os.getpid(), signal.SIGKILL)


def after_write(path: str | os.PathLike, renamed: bool = True) -> None:
    """Call right after a durable write of `path`; kills the process when it is write number
    $SELFALIGN_KILL_AFTER_WRITE, and appends "N<TAB>path" to $SELFALIGN_WRITE_LOG if set.

    renamed=False marks a write with no temporary (a journal line): it dies here in either mode."""
    global _count
    writes_so_far()  # starts the count again in a forked child
    _count += 1
    log = os.environ.get("SELFALIGN_WRITE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{_count}\t{os.fspath(path)}\n")
    if _count == _target() and not (renamed and os.environ.get("SELFALIGN_KILL_BEFORE_RENAME")):
        os.kill(os.getpid(), signal.SIGKILL)


def nan_at_step(step: int) -> bool:
    """Whether $SELFALIGN_NAN_AT_STEP asks for optimizer step `step` (1-based) to diverge."""
    value = os.environ.get("SELFALIGN_NAN_AT_STEP", "")
    return bool(value.strip()) and int(value) == step
