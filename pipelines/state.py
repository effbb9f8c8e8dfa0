"""Task state files, fingerprints and the run-directory lock.

A task (stage × slide, or stage × cohort) is up to date only when its state file says ``done``,
its recorded fingerprint equals the one computed now, and its artifacts exist. The fingerprint
hashes the stage name, the config fields the stage uses, its inputs' fingerprints (the slide
file, upstream tasks) and the package version.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines import __version__
from pipelines.artifacts import RunPaths, write_json

COHORT = "_cohort"  # state-file name of cohort tasks; sanitised slide ids never start with "_"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def fingerprint(stage: str, params: Any, inputs: list[Any]) -> str:
    """sha256 over stage name, its parameters, its inputs' fingerprints and the package version."""
    blob = json.dumps({"stage": stage, "params": params, "inputs": inputs, "version": __version__},
                      sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class HashCache:
    """sha256 of files keyed by (path, size, mtime), so ``content`` fingerprints hash each file once."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.changed = False
        if path is not None:
            try:
                self.entries = json.loads(Path(path).read_text())
            except (OSError, ValueError):
                self.entries = {}

    def sha256(self, path: Path, st: os.stat_result) -> str:
        key = str(path)
        hit = self.entries.get(key)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return hit["sha256"]
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        self.entries[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest.hexdigest()}
        self.changed = True
        return digest.hexdigest()

    def save(self) -> None:
        if self.path is not None and self.changed:
            write_json(self.path, self.entries)
            self.changed = False


_PROCESS_HASHES = HashCache()  # content hashes this process already computed, when no run cache is given


def file_fingerprint(path: Path, mode: str = "stat", cache: HashCache | None = None) -> dict:
    """Identity of an input file: size + mtime (``stat``) or its size + sha256 (``content``)."""
    try:
        st = path.stat()
    except OSError:
        return {"path": str(path), "missing": True}
    if mode == "content":  # content only: moving or touching the file keeps it
        return {"size": st.st_size, "sha256": (cache or _PROCESS_HASHES).sha256(path, st)}
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_state(paths: RunPaths, stage: str, key: str) -> dict | None:
    """The state of a task, or None when it never ran (or its file is unreadable)."""
    try:
        return json.loads(paths.state(stage, key).read_text())
    except (OSError, ValueError):
        return None


def write_state(paths: RunPaths, stage: str, key: str, **fields: Any) -> dict:
    state = {"stage": stage, "slide_id": key, "host": socket.gethostname(), "pid": os.getpid(),
             "version": __version__, **fields}
    write_json(paths.state(stage, key), state)
    return state


def current_epoch(paths: RunPaths) -> str | None:
    """The epoch of the run holding the run directory's lock now (None: no run holds it)."""
    try:
        return json.loads(paths.lock.read_text()).get("epoch")
    except (OSError, ValueError):
        return None


class LockError(RuntimeError):
    """The run directory is in use by another run."""


@dataclass
class RunLock:
    """An O_EXCL lock file ``OUT/.lock`` naming host, pid, start time and the run's epoch (a fresh id per run:
    the fence of its tasks' writes, ``pipelines.runner.run_task``).

    A lock left by a dead process on this host (pid gone, or reused by a process that started
    later) is stale and is taken over with a warning. A lock from another host cannot be checked:
    it is refused unless ``break_lock``.
    """

    path: Path
    held: bool = False
    me: dict | None = None

    def acquire(self, break_lock: bool = False, command: str = "") -> list[str]:
        """Take the lock or raise :class:`LockError`; returns notes about stale locks taken over.

        Check-and-take runs under an ``flock`` on a guard file, so two runs on this host that find
        the same stale lock cannot both take it over.
        """
        import fcntl

        notes: list[str] = []
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": now(),
                   "process_start": _process_start(os.getpid()), "command": command, "epoch": uuid.uuid4().hex}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".guard"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                fd = self._create()
                if fd is None and not self.path.exists():  # released between our two looks
                    fd = self._create()
                if fd is None:
                    holder = self.holder()
                    stale = self.is_stale(holder)
                    if not (stale or break_lock):
                        raise LockError(
                            f"{self.path.parent} is in use by pid {holder.get('pid')} on {holder.get('host')} since "
                            f"{holder.get('started')} ({holder.get('command', '')}). Wait for it to finish; if that run "
                            f"is dead (e.g. on another machine), rerun with --break-lock.")
                    why = "stale" if stale else "broken with --break-lock"
                    notes.append(f"removed {why} lock of pid {holder.get('pid')} on {holder.get('host')} "
                                 f"(started {holder.get('started')})")
                    self.path.unlink(missing_ok=True)
                    fd = self._create()
                    if fd is None:
                        raise LockError(f"could not take the lock {self.path}: another run took it just now")
                with os.fdopen(fd, "w") as f:
                    json.dump(self.me, f)
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)
        self.held = True
        return notes

    def _create(self) -> int | None:
        try:
            return os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None

    def release(self) -> None:
        """Remove the lock only if it is still ours (``--break-lock`` may have handed it to another run)."""
        if self.held:
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
