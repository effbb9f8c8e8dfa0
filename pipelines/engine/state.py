"""Task state files and fingerprints (the run-directory lock: :mod:`pipelines.engine.run_lock`).

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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines import __version__
from pipelines.engine.run_dir import RunPaths, write_json

COHORT = "_cohort"  # state-file name of cohort tasks; sanitised slide ids never start with "_"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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
        with open(paths.state_file(stage, key), "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def write_state(paths: RunPaths, stage: str, key: str, **fields: Any) -> dict:
    state = {"stage": stage, "slide_id": key, "host": socket.gethostname(), "pid": os.getpid(),
             "version": __version__, **fields}
    write_json(paths.state(stage, key), state)
    return state
