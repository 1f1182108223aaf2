"""A run directory is owned by one process: a lock file with the owner's pid, and cleanup on resume.

`RUN/run.lock` holds the pid, host and process start time of the process that owns the run.
A second run on the same directory while the owner is alive stops with a one-line error. A
lock whose owner is gone (killed, crashed, machine rebooted) is stale: it is taken over, and
the dead run's leftover temporaries (`*.tmp`, half-written files and directories that were
never renamed into place) are removed before the resumed run writes anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError

LOCK = "run.lock"
DATA = "data.json"  # what the run's data sources held when it started (check_same_data)


class RunLockedError(ConfigError):
    """Another live process owns the run directory."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), telling a reused pid from the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner_alive(owner: dict) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or owner.get("host") != socket.gethostname():
        return True  # another machine's process (shared file system): cannot tell, so assume alive
    if pid == os.getpid() or not _alive(pid):
        return False
    started = owner.get("started")
    return started is None or _start_time(pid) in (None, started)


# Where selfalign writes (file.tmp -> file): only these are cleaned, never a user's own *.tmp elsewhere.
TEMP_GLOBS = ("*.tmp", "iter_*/*.tmp", "iter_*/round_*/*.tmp", "iter_*/train_state/*.tmp", "checkpoint/*.tmp")


def clean_temporaries(out: Path) -> list[Path]:
    """Remove the `*.tmp` files and directories a killed run left in the places selfalign writes."""
    removed = []
    for path in sorted({p for pattern in TEMP_GLOBS for p in out.glob(pattern)}, key=lambda p: -len(p.parts)):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def data_digest(source: str | Path, rows: Sequence[Any]) -> dict[str, Any]:
    """What a run records of one data source: where it came from, its row count and the sha256 of its rows as read
    (a prompt's text or messages, a pair's token ids): an edit that changes what the run trains on changes the
    digest, reformatting the file does not."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return {"source": str(source), "rows": len(rows), "sha256": h.hexdigest()}


def check_same_data(out: Path, data: dict[str, dict[str, Any]], write: bool) -> None:
    """Record the run's data sources (data_digest each) in RUN/data.json, or refuse (ConfigError) to resume when one
    holds other rows than when the run started: the slices already trained on would no longer be the file's.

    A run started before data.json existed is not refused; its data is recorded from this resume on.
    write: whether this process writes (the main one).
    """
    from .data import write_atomic

    path = out / DATA
    if not path.exists():
        if write:
            write_atomic(path, json.dumps(data, indent=1) + "\n")
        return
    saved = json.loads(path.read_text())
    changed = [f"{key} {now['source']}: {was['rows']} rows, sha256 {was['sha256'][:12]} -> {now['rows']} rows, "
               f"sha256 {now['sha256'][:12]}"
               for key, now in data.items() if (was := saved.get(key)) and was["sha256"] != now["sha256"]]
    if changed:
        raise ConfigError(f"{path}: the run started on other data ({'; '.join(changed)}); restore the data as it was "
                          "to resume, or choose another output_dir to start afresh")


class RunLock:
    """`with RunLock(out):` owns `out` for the block; ConfigError if a live process owns it already.

    Creates `out` if needed (a ConfigError names it if it cannot be created or written), and
    removes any directories it created if they are still empty on exit, so a run refused for
    bad input leaves no trace. Only the main process of a distributed job should take it.

    Hand-written rather than filelock's FileLock: the lock file names its owner (host, pid, start time), so a
    refusal says who holds the run and a lock left by a killed process is taken over once its owner is gone;
    an flock()-based lock names nobody and is unreliable on the network file systems cluster runs often
    write to.
    """

    def __init__(self, out: Path, enabled: bool = True) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK
        self.enabled = enabled
        self.created: list[Path] = []

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        missing = []
        parent = self.out
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"output_dir: cannot create '{self.out}' ({e.strerror}); choose a writable output_dir=...") from e
        self.created = missing
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as e:
                self._remove_created()
                raise ConfigError(f"output_dir: cannot write in '{self.out}' ({e.strerror}); "
                                  "choose a writable output_dir=...") from e
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            clean_temporaries(self.out)
            return self
        raise RunLockedError(f"{self.out} is locked by {self.path} and the lock could not be taken over")

    def _take_over_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            owner = {}  # a lock cut short by a kill while it was written: its owner never started
        if not isinstance(owner, dict):
            owner = {}
        if owner and _owner_alive(owner):
            self._remove_created()
            raise RunLockedError(
                f"{self.out} is in use by another selfalign process (pid {owner.get('pid')} on {owner.get('host')}); "
                f"wait for it to finish or stop it, or choose another output_dir=... (if no such process is running, "
                f"delete {self.path})")
        # Stale: move it aside atomically so that two resumers cannot both take it over.
        aside = self.path.with_name(f"{LOCK}.stale.{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if json.loads(aside.read_text() or "{}") != owner:  # another resumer's fresh lock: put it back
                os.link(aside, self.path)
        except (OSError, ValueError):
            pass
        aside.unlink(missing_ok=True)

    def _remove_created(self) -> None:
        for path in self.created:  # innermost first
            try:
                path.rmdir()
            except OSError:
                break
        self.created = []

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if not self.enabled:
            return
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            owner = {}
        if owner.get("pid") == os.getpid():
            if exc_type is not None:  # stopped (an error, Ctrl-C, SIGTERM): drop the unfinished stage's temporaries
                clean_temporaries(self.out)
            self.path.unlink(missing_ok=True)
        self._remove_created()
