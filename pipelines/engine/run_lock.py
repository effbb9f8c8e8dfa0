"""The run-directory lock: one run at a time per directory, its epoch the fence of its tasks' writes.

``OUT/.lock`` is created with ``O_CREAT | O_EXCL`` and names host, pid, process start, command and the run's
epoch (a fresh id per run, which every task carries: ``pipelines.runner.run_task``). While held, its mtime is
touched every ``HEARTBEAT_S``: a lock whose heartbeat stopped ``STALE_AFTER_S`` ago is stale on any host, so a
run killed on another node of a cluster does not hold its directory forever.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.engine.run_dir import RunPaths
from pipelines.engine.state import now

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0  # how often a held lock's mtime is touched
STALE_AFTER_S = 600.0  # a lock not touched for this long belongs to a dead run, whatever its host
GUARD_STALE_S = 30.0  # an O_EXCL guard file older than this was left by a dead process (held for milliseconds)
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF)  # "this filesystem has no flock"


def current_epoch(paths: RunPaths) -> str | None:
    """The epoch of the run holding the run directory's lock now (None: no run holds it)."""
    try:
        return json.loads(paths.lock.read_text()).get("epoch")
    except (OSError, ValueError):
        return None


class LockError(RuntimeError):
    """The run directory is in use by another run."""


@contextmanager
def exclusive(guard: Path, notes: list[str]) -> Iterator[None]:
    """Hold ``guard`` exclusively for a few milliseconds: an ``flock`` on it, or, where the filesystem has no
    flock (Lustre mounted without it, some NFS setups), an ``O_EXCL`` guard file beside it (one left by a dead
    process is removed after ``GUARD_STALE_S``), and ``notes`` says so."""
    import fcntl

    with open(guard, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in NO_FLOCK:
                raise
        else:
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
            return
    excl = guard.with_name(guard.name + ".excl")
    notes.append(f"the filesystem of {guard.parent} has no flock: an O_EXCL guard file ({excl.name}) stands in")
    deadline = time.monotonic() + 2 * GUARD_STALE_S
    while True:
        try:
            os.close(os.open(excl, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            break
        except FileExistsError:
            try:
                if time.time() - excl.stat().st_mtime > GUARD_STALE_S:
                    excl.unlink(missing_ok=True)  # left by a process that died holding it
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                raise LockError(f"{excl} stays in place: another run is taking the lock, or one died doing so "
                                "(remove the file if no run is starting)") from None
            time.sleep(0.05)
    try:
        yield
    finally:
        excl.unlink(missing_ok=True)


@dataclass
class RunLock:
    """An O_EXCL lock file ``OUT/.lock`` naming host, pid, start time and the run's epoch, its mtime a heartbeat.

    A lock left by a dead process on this host (pid gone, or reused by a process that started later), or one
    whose heartbeat stopped ``STALE_AFTER_S`` ago on any host, is stale and is taken over with a note. A live
    lock from another host is refused unless ``break_lock``.
    """

    path: Path
    held: bool = False
    me: dict | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _beat: threading.Thread | None = field(default=None, repr=False)

    def acquire(self, break_lock: bool = False, command: str = "") -> list[str]:
        """Take the lock or raise :class:`LockError`; returns notes (stale locks taken over, no flock).

        Check-and-take runs under :func:`exclusive`, so two runs that find the same stale lock cannot both
        take it over.
        """
        notes: list[str] = []
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": now(),
                   "process_start": _process_start(os.getpid()), "command": command, "epoch": uuid.uuid4().hex}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(self.path.with_name(self.path.name + ".guard"), notes):
            fd = self._create()
            if fd is None and not self.path.exists():  # released between our two looks
                fd = self._create()
            if fd is None:
                holder = self.holder()
                stale = self.is_stale(holder) or self.heartbeat_stopped()
                if not (stale or break_lock):
                    raise LockError(
                        f"{self.path.parent} is in use by pid {holder.get('pid')} on {holder.get('host')} since "
                        f"{holder.get('started')} ({holder.get('command', '')}). Wait for it to finish; if that run "
                        f"is dead (e.g. on another machine), rerun with --break-lock, or wait "
                        f"{STALE_AFTER_S:.0f} s after its last heartbeat.")
                why = "stale" if stale else "broken with --break-lock"
                notes.append(f"removed {why} lock of pid {holder.get('pid')} on {holder.get('host')} "
                             f"(started {holder.get('started')})")
                self.path.unlink(missing_ok=True)
                fd = self._create()
                if fd is None:
                    raise LockError(f"could not take the lock {self.path}: another run took it just now")
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
        self.held = True
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()
        return notes

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # taken over (--break-lock) or removed: nothing of ours to keep alive
                return

    def heartbeat_stopped(self) -> bool:
        """Whether the lock file has not been touched for ``STALE_AFTER_S`` (its run is dead, wherever it ran)."""
        try:
            return time.time() - self.path.stat().st_mtime > STALE_AFTER_S
        except OSError:
            return False

    def _create(self) -> int | None:
        try:
            return os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None

    def release(self) -> None:
        """Remove the lock only if it is still ours (``--break-lock`` may have handed it to another run)."""
        if self.held:
            self._stop.set()
            if self._beat is not None:
                self._beat.join()
            if self.holder() == self.me:
                self.path.unlink(missing_ok=True)
            self.held = False

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"pid": None, "host": None, "started": "unknown"}
        except (OSError, ValueError):
            # an empty or half-written lock: its writer died between open and write, or is writing now
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                age = 0.0
            return {"pid": None, "host": socket.gethostname() if age > 10 else None, "started": "unknown"}

    @staticmethod
    def is_stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False
        pid = holder.get("pid")
        if pid is None:
            return True
        start = _process_start(int(pid))
        if start is None:
            return True  # no such process
        recorded = holder.get("process_start")
        return recorded is not None and abs(start - recorded) > 1.0  # pid reused by a newer process

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
