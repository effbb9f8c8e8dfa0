"""The Dask runner with real processes: SIGKILL and resume, an external scheduler losing a worker,
run-directory locks, fingerprints that rerun exactly what a change affects, status."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import corrupt_jpeg_tiles

CLI = [sys.executable, "-m", "pipelines.cli"]
RUN_YAML = "tissue:\n  preset: bwh_biopsy\n  area_reference_mpp: 0.25\nrunner:\n  n_workers: 2\n"


def wsi(*args, timeout=300) -> subprocess.CompletedProcess:
    """The CLI; runs stop after the qc stage (these tests are about the runner, not feature extraction)."""
    args = [*map(str, args)]
    if args[0] == "run" and "--until" not in args:
        args += ["--until", "qc"]
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def many_slides_csv(cohort: Path, folder: Path, n_rows: int) -> Path:
    """``n_rows`` slides (the four demo files under distinct ids) plus a run config."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["demo_000.svs", "demo_001.svs", "demo_002.tif", "demo_003.svs"]
    rows = ["slide_path,slide_id,label"] + [f"{cohort / names[i % 4]},s{i:03d},{'tumor' if i % 2 else 'normal'}"
                                            for i in range(n_rows)]
    (folder / "slides.csv").write_text("\n".join(rows) + "\n")
    (folder / "run.yaml").write_text(RUN_YAML)
    return folder / "slides.csv"


def states(out: Path, stage: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "state" / stage).glob("*.json"))}


def artifact_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for folder in ("tissue", "tiles", "qc")
            for p in sorted((out / folder).rglob("*")) if p.is_file()}


def assert_no_half_written_artifacts(out: Path) -> None:
    import numpy as np

    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") and not p.name.startswith(".")]
    for meta in (out / "tiles").glob("*.json"):
        json.loads(meta.read_text())  # complete JSON
        coords = np.load(out / "tiles" / meta.name.replace(".json", ".coords.npy"))  # data written before its metadata
        assert coords.shape[1] == 2
    for meta in (out / "tissue").glob("*.json"):
        json.loads(meta.read_text())
        assert (out / "tissue" / "masks" / meta.name.replace(".json", ".png")).exists()


def test_sigkill_mid_run_resumes_only_unfinished_work_with_identical_results(cohort, tmp_path):
    csv = many_slides_csv(cohort, tmp_path / "in", 48)
    reference = tmp_path / "reference"
    assert wsi("run", csv, "--config", tmp_path / "in" / "run.yaml", "--out", reference).returncode == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen([*CLI, "run", str(csv), "--config", str(tmp_path / "in" / "run.yaml"), "--out", str(out),
                             "--until", "qc"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = [s for s in states(out, "tiles").values() if s.get("status") == "done"] if (out / "state").exists() else []
        if len(done) >= 6:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its local cluster, like a power cut
    proc.wait()
    done_before = {k: v for k, v in states(out, "tiles").items() if v["status"] == "done"}
    assert 6 <= len(done_before) < 48, "the kill must land mid-run"
    assert (out / ".lock").exists()  # left behind by the killed run: stale
    assert_no_half_written_artifacts(out)

    status = wsi("status", out, "--json")
    report = json.loads(status.stdout)
    assert status.returncode == 1 and report["locked_by"] is None
    assert {c["tiles"]["status"] for c in report["slides"].values()} >= {"done", "pending"}

    resumed = wsi("run", csv, "--config", tmp_path / "in" / "run.yaml", "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert "removed stale lock" in resumed.stderr
    after = states(out, "tiles")
    for slide_id, state in done_before.items():
        assert after[slide_id] == state, f"{slide_id} was finished before the kill and must not rerun"
    assert all(s["status"] == "done" for s in after.values()) and len(after) == 48
    resumed_bytes, reference_bytes = artifact_bytes(out), artifact_bytes(reference)
    assert sorted(resumed_bytes) == sorted(reference_bytes)  # no leftovers from the killed run either
    assert [k for k in reference_bytes if resumed_bytes[k] != reference_bytes[k]] == []
    assert not (out / ".lock").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_dask(address: str, port: int, n_workers: int) -> list[subprocess.Popen]:
    """``dask scheduler`` and ``n_workers`` single-threaded ``dask worker`` processes on 127.0.0.1."""
    dask = shutil.which("dask", path=os.path.dirname(sys.executable)) or "dask"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", "127.0.0.1:0"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)]
    for _ in range(n_workers):
        procs.append(subprocess.Popen([dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1",
                                       "--dashboard-address", "127.0.0.1:0"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
    from distributed import Client

    with Client(address, timeout="60s") as client:
        client.wait_for_workers(n_workers, timeout=60)
    return procs


def test_external_scheduler_survives_losing_a_worker_and_a_lost_scheduler_stops_the_run_for_a_rerun(cohort, tmp_path):
    """A worker killed mid-run: its tasks are retried on the other. Then the scheduler killed: the run stops at
    once with a message saying so and what to do; on a new cluster the same command finishes the run, keeping
    what was done."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = _start_dask(address, port, 2)
    try:
        csv = many_slides_csv(cohort, tmp_path / "in", 40)
        out = tmp_path / "out"
        command = [*CLI, "run", str(csv), "--config", str(tmp_path / "in" / "run.yaml"), "--out", str(out), "--until", "qc"]
        run = subprocess.Popen([*command, "--scheduler", address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def wait_for_tissue(n: int) -> None:
            deadline = time.time() + 120
            while time.time() < deadline and len([s for s in (states(out, "tissue") if (out / "state").exists() else {})
                                                  .values() if s["status"] == "done"]) < n:
                time.sleep(0.02)

        wait_for_tissue(4)
        os.killpg(procs[1].pid, signal.SIGKILL)  # nanny and worker: the worker is gone for good
        wait_for_tissue(12)
        os.killpg(procs[0].pid, signal.SIGKILL)  # the scheduler
        stdout, stderr = run.communicate(timeout=120)
        message = " ".join(stderr.split())
        assert run.returncode == 2 and f"lost the Dask scheduler at {address}" in message, stderr[-3000:]
        assert "rerun the same command to resume" in message and "Traceback" not in stderr
        done_before = {k: s for k, s in states(out, "tissue").items() if s["status"] == "done"}
        assert 12 <= len(done_before) < 40
        stop_all(procs)
        port = _free_port()
        address = f"tcp://127.0.0.1:{port}"
        procs = _start_dask(address, port, 2)
        rerun = subprocess.run([*command, "--scheduler", address], capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert len([s for s in states(out, "tiles").values() if s["status"] == "done"]) == 40
        assert states(out, "qc")["_cohort"]["status"] == "done"
        assert all(states(out, "tissue")[k] == s for k, s in done_before.items())  # kept, not redone
        coords = {i: (out / "tiles" / f"s{i:03d}.coords.npy").read_bytes() for i in range(40)}
        assert all(coords[i] == coords[i % 4] for i in range(40))  # whichever worker, attempt or run made them
        assert "Dask dashboard" in rerun.stderr
    finally:
        stop_all(procs)


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture()
def small_run(cohort, tmp_path):
    csv = many_slides_csv(cohort, tmp_path / "in", 4)
    out = tmp_path / "out"
    result = wsi("run", csv, "--config", tmp_path / "in" / "run.yaml", "--out", out)
    assert result.returncode == 0, result.stderr
    return csv, tmp_path / "in" / "run.yaml", out


def test_a_task_of_a_killed_run_that_finishes_late_cannot_replace_the_newer_result(small_run):
    """Run A's client was killed while its tissue task of s000 kept running on a remote worker (Dask cannot stop
    a running task); run B took the directory over and redid the task with another preset. A's task then
    finishes: every write it tries is refused (fenced by the run's epoch), and B's result stands, state included."""
    import yaml

    from pipelines.config import RunConfig
    from pipelines.engine.run_lock import RunLock
    from pipelines.engine.task import run_task
    from pipelines.manifest import read_manifest
    from pipelines.stages.table import STAGES

    csv, config, out = small_run
    epoch_a = states(out, "tissue")["s000"]["epoch"]
    assert epoch_a and states(out, "tiles")["s000"]["epoch"] == epoch_a  # every task of a run carries its epoch
    config.write_text(RUN_YAML.replace("bwh_biopsy", "tcga"))  # run B: another preset
    assert wsi("run", csv, "--config", config, "--out", out, "--until", "tissue").returncode == 0
    epoch_b, state_b = states(out, "tissue")["s000"]["epoch"], states(out, "tissue")["s000"]
    assert epoch_b != epoch_a
    tissue_b = {p.relative_to(out): p.read_bytes() for p in sorted((out / "tissue").rglob("*")) if p.is_file()}
    entry = next(e for e in read_manifest(csv) if e.slide_id == "s000")
    config_a = RunConfig.model_validate(yaml.safe_load(RUN_YAML))
    with RunLock(out / ".lock") as lock:  # a run C holds the directory while A's task ends: refused too
        lock.acquire(command="run C")
        late = run_task(STAGES.ref, "tissue", "s000", entry, config_a, str(out), "fingerprint-of-a", 1, epoch=epoch_a)
        assert late["status"] == "stale" and "belongs to run " + epoch_a in late["reason"]
        assert run_task(STAGES.ref, "tissue", "s000", entry, config_a, str(out), "fingerprint-of-c", 1,
                        epoch=lock.me["epoch"])["status"] == "done"  # the current run's own task writes
        assert states(out, "tissue")["s000"]["fingerprint"] == "fingerprint-of-c"
    tissue_c = {p.relative_to(out): p.read_bytes() for p in sorted((out / "tissue").rglob("*")) if p.is_file()}
    assert tissue_c != tissue_b  # C's task did replace B's result (another preset: another mask)
    for name, data in tissue_b.items():  # back to B's result, then no run holds the directory
        (out / name).write_bytes(data)
    (out / "state" / "tissue" / "s000.json").write_text(json.dumps(state_b))
    late = run_task(STAGES.ref, "tissue", "s000", entry, config_a, str(out), "fingerprint-of-a", 1, epoch=epoch_a)
    assert late["status"] == "stale" and "no run holds" in late["reason"]  # B finished: no run is A's
    assert states(out, "tissue")["s000"] == state_b
    assert {p.relative_to(out): p.read_bytes() for p in sorted((out / "tissue").rglob("*")) if p.is_file()} == tissue_b
    assert not [p for p in out.rglob("*.tmp")]


def test_slides_fingerprinted_by_content_are_read_at_their_new_path_after_a_move(cohort, tmp_path):
    """With ``slides.fingerprint: content`` a moved slide is the same slide: its tissue and tiles stay done, and the
    stages that run later read it where slides.csv says it is now, not where its tissue task once found it."""
    before, after = tmp_path / "archive", tmp_path / "moved"
    before.mkdir()
    for name in ("demo_000.svs", "demo_001.svs"):
        shutil.copy(cohort / name, before / name)
    csv = tmp_path / "slides.csv"
    csv.write_text("slide_path,slide_id\n" + "".join(f"{before / n},{n[:8]}\n" for n in ("demo_000.svs", "demo_001.svs")))
    config = tmp_path / "run.yaml"
    config.write_text(RUN_YAML + "slides:\n  fingerprint: content\nfeatures:\n  teacher: {model: vit_tiny, seed: 0}\n")
    out = tmp_path / "out"
    assert wsi("run", csv, "--config", config, "--out", out, "--until", "tiles").returncode == 0
    tissue_before = states(out, "tissue")
    before.rename(after)
    csv.write_text(csv.read_text().replace(str(before), str(after)))
    result = wsi("run", csv, "--config", config, "--out", out, "--until", "features")
    assert result.returncode == 0, result.stderr
    assert states(out, "tissue") == tissue_before and "4 up-to-date" in result.stderr  # tissue and tiles
    assert {s["status"] for s in states(out, "features").values()} == {"done"}


def test_changing_a_tiling_parameter_reruns_tiles_but_not_tissue(small_run):
    csv, config, out = small_run
    tissue_before, tiles_before = states(out, "tissue"), states(out, "tiles")
    qc_before = states(out, "qc")["_cohort"]
    config.write_text(RUN_YAML + "tiling:\n  patch_size: 224\n")
    status = json.loads(wsi("status", out, "--json").stdout)  # status reads the run's own run.yaml: still done
    assert status["slides"]["s000"]["tiles"]["status"] == "done"
    result = wsi("run", csv, "--config", config, "--out", out)
    assert result.returncode == 0, result.stderr
    assert states(out, "tissue") == tissue_before
    tiles_after = states(out, "tiles")
    assert all(tiles_after[k]["started"] != tiles_before[k]["started"] for k in tiles_before)
    assert all(tiles_after[k]["fingerprint"] != tiles_before[k]["fingerprint"] for k in tiles_before)
    assert states(out, "qc")["_cohort"]["started"] != qc_before["started"]
    assert json.loads((out / "tiles" / "s000.json").read_text())["patch_size"] == 224
    assert "4 up-to-date" in result.stderr  # the tissue tasks


def test_until_only_and_force(small_run):
    csv, config, out = small_run
    before = states(out, "tissue")
    result = wsi("run", csv, "--config", config, "--out", out, "--only", "s001", "--force", "tissue")
    assert result.returncode == 0, result.stderr
    after = states(out, "tissue")
    assert after["s001"]["started"] != before["s001"]["started"]
    assert all(after[k] == before[k] for k in before if k != "s001")
    assert "cohort stages were not run" in result.stderr
    fresh = out.parent / "fresh"
    result = wsi("run", csv, "--config", config, "--out", fresh, "--until", "tissue")
    assert result.returncode == 0
    assert len(states(fresh, "tissue")) == 4 and not (fresh / "state" / "tiles").exists()
    assert wsi("run", csv, "--config", config, "--out", fresh, "--until", "tilez").returncode == 2
    assert wsi("run", csv, "--config", config, "--out", fresh, "--only", "nobody").returncode == 2


def test_slide_file_change_reruns_that_slide(small_run, tmp_path):
    csv, config, out = small_run
    before = states(out, "tissue")
    path = Path(json.loads((out / "tissue" / "s000.json").read_text())["slide_path"])
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: size+mtime fingerprint changes
    try:
        assert wsi("run", csv, "--config", config, "--out", out).returncode == 0
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = states(out, "tissue")
    assert after["s000"]["started"] != before["s000"]["started"]
    assert all(after[k] == before[k] for k in ("s001", "s002", "s003"))  # other files untouched


def test_corrupt_slide_is_retried_then_reported_by_status(cohort, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(cohort / "demo_003.svs", folder / "bad.svs")
    corrupt_jpeg_tiles(folder / "bad.svs", level=-1)
    (folder / "slides.csv").write_text(f"slide_path,slide_id\n{cohort / 'demo_000.svs'},good\nbad.svs,bad\n"
                                       f"{cohort / 'demo_002.tif'},good2\n")
    (folder / "run.yaml").write_text(RUN_YAML + "  retries: 2\n")
    out = tmp_path / "out"
    result = wsi("run", folder / "slides.csv", "--config", folder / "run.yaml", "--out", out)
    assert result.returncode == 1
    assert "failed tissue/bad" in result.stderr and "cannot read region" in result.stderr
    assert "qc ran on 2/3 slides" in result.stderr
    bad = states(out, "tissue")["bad"]
    assert bad["status"] == "failed" and bad["attempts"] == 3
    status = wsi("status", out, "--json")
    report = json.loads(status.stdout)
    assert status.returncode == 1
    assert report["slides"]["bad"]["tissue"]["status"] == "failed"
    assert "cannot read region" in report["slides"]["bad"]["tissue"]["error"]
    assert report["slides"]["bad"]["tiles"]["status"] == "skipped"
    assert report["slides"]["good"]["tiles"]["status"] == "done"
    table = wsi("status", out)
    assert "bad" in table.stdout and "failed" in table.stdout and "cannot read region" in table.stdout


def test_concurrent_run_is_refused_and_stale_locks_are_recovered(small_run):
    csv, config, out = small_run
    import psutil

    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": "now", "process_start": psutil.Process().create_time()}
    lock = out / ".lock"
    lock.write_text(json.dumps(me))  # a live process on this host holds it
    refused = wsi("run", csv, "--config", config, "--out", out)
    assert refused.returncode == 2 and f"in use by pid {os.getpid()}" in refused.stderr
    assert json.loads(wsi("status", out, "--json").stdout)["locked_by"]["pid"] == os.getpid()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({**me, "pid": dead.pid, "process_start": 1.0}))
    recovered = wsi("run", csv, "--config", config, "--out", out)
    assert recovered.returncode == 0 and "removed stale lock" in recovered.stderr
    assert not lock.exists()

    lock.write_text(json.dumps({**me, "host": "some-other-node"}))  # cannot be checked from here
    assert wsi("run", csv, "--config", config, "--out", out).returncode == 2
    broken = wsi("run", csv, "--config", config, "--out", out, "--break-lock")
    assert broken.returncode == 0 and "--break-lock" in broken.stderr


def test_lock_heartbeat_and_a_filesystem_without_flock(tmp_path, monkeypatch):
    """A lock from another host is live while its heartbeat beats and stale once it stopped; where flock fails
    (Lustre without flock, some NFS), an O_EXCL guard file stands in and the notes say so."""
    import errno
    import fcntl

    from pipelines.engine import run_lock
    from pipelines.engine.run_lock import LockError, RunLock

    path = tmp_path / ".lock"
    path.write_text(json.dumps({"host": "some-other-node", "pid": 1, "started": "then"}))
    with pytest.raises(LockError, match="some-other-node"):
        RunLock(path).acquire()  # just touched: its run may be alive
    old = time.time() - run_lock.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)

    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = RunLock(path)
    notes = lock.acquire(command="test")
    assert any("removed stale lock of pid 1 on some-other-node" in n for n in notes)
    assert any("has no flock: an O_EXCL guard file" in n for n in notes)
    assert not (tmp_path / ".lock.guard.excl").exists()  # the guard is held only while taking the lock
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5  # the holder's heartbeat touched it again
    with pytest.raises(LockError, match="in use"):
        RunLock(path).acquire()  # without flock as well
    lock.release()
    assert not path.exists()


def test_status_is_kept_between_calls_and_follows_every_change(small_run):
    """``status`` answers from its kept report while nothing it was derived from changed, and derives it again when
    a state file is edited (even in place), an artifact deleted or the run's config changed."""
    from pipelines.status import run_status

    csv, config, out = small_run
    derived = run_status(out, use_cache=False)
    assert (out / "state" / "_status.json").exists()
    assert run_status(out) == derived
    state_file = out / "state" / "tiles" / "s001.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "status": "failed", "error": "edited"}))  # in place, same folder
    assert run_status(out)["slides"]["s001"]["tiles"]["status"] == "failed"
    state_file.write_text(json.dumps(state))
    (out / "tiles" / "s002.coords.npy").unlink()
    assert run_status(out)["slides"]["s002"]["tiles"]["status"] == "stale"
    assert run_status(out) == run_status(out, use_cache=False)


def test_content_fingerprints_survive_touch_and_are_cached(cohort, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(cohort / "demo_002.tif", folder / "a.tif")
    (folder / "slides.csv").write_text("slide_path\na.tif\n")
    (folder / "run.yaml").write_text(RUN_YAML + "slides:\n  fingerprint: content\n")
    out = tmp_path / "out"
    assert wsi("run", folder / "slides.csv", "--config", folder / "run.yaml", "--out", out).returncode == 0
    cache = json.loads((out / "state" / "_hashes.json").read_text())
    assert len(cache) == 1 and len(next(iter(cache.values()))["sha256"]) == 64
    os.utime(folder / "a.tif")  # new mtime, same bytes
    again = wsi("run", folder / "slides.csv", "--config", folder / "run.yaml", "--out", out)
    assert again.returncode == 0 and "3 up-to-date" in again.stderr
    with open(folder / "a.tif", "r+b") as f:  # same size and mtime would fool `stat`; content changes
        f.seek(-10, 2)
        f.write(b"0123456789")
    changed = wsi("run", folder / "slides.csv", "--config", folder / "run.yaml", "--out", out)
    assert "3 up-to-date" not in changed.stderr


def test_local_workers_start_without_malloc_trim_or_the_profiler_unless_asked():
    """Dask's MALLOC_TRIM_THRESHOLD_ makes glibc mmap every tensor above 128 KiB (torch page-faults): the local
    cluster's workers start without it, and with it when runner.malloc_trim asks for the lower RSS. Dask's
    profiler (a stack sample of every thread every 10 ms) runs only when runner.worker_profiler asks. Either way
    a worker has imported the slide readers before its first task (the warm-up plugin), not in it."""
    from pipelines.config import RunConfig
    from pipelines.engine.cluster import dask_client
    from pipelines.stages.table import STAGES

    def worker_state(dask_worker):
        return (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS"),
                all(name in sys.modules for name in ("tiffslide", "zarr", "openslide", "cv2")),
                "profile" in dask_worker.periodic_callbacks)

    # malloc_trim first: Dask's nanny writes its variables into this process's environment, where the next
    # cluster would inherit them unless they are restored
    for trim, profiler, expected in ((True, True, "65536"), (False, False, None)):
        cfg = RunConfig.model_validate({"runner": {"n_workers": 1, "malloc_trim": trim, "worker_profiler": profiler}})
        with dask_client(cfg, 1, warm_up=STAGES.warm_up) as client:
            seen = client.run(worker_state)
        assert list(seen.values()) == [(expected, "1", True, profiler)]  # the thread limit stays either way
        assert "MALLOC_TRIM_THRESHOLD_" not in os.environ


def test_a_task_s_peak_memory_counts_its_children_and_grandchildren():
    """PeakRSS adds the processes a task started (DataLoader workers, their helpers), found from Linux's per-thread
    children lists, as psutil finds them by reading every process on the machine."""
    import subprocess

    import psutil

    from pipelines.engine.task import PeakRSS, descendants

    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "child = subprocess.Popen([sys.executable, '-c', 'x = bytearray(200 << 20); "
                               "import time; time.sleep(30)']); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while len(psutil.Process(parent.pid).children(recursive=True)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        grown = time.monotonic() + 20
        while time.monotonic() < grown:  # the grandchild has made its 200 MiB
            children = psutil.Process(parent.pid).children()
            if children and children[0].memory_info().rss > 200 << 20:
                break
            time.sleep(0.05)
        grandchild = [p.pid for p in psutil.Process(parent.pid).children()]
        assert descendants(parent.pid) == grandchild and len(grandchild) == 1
        found = descendants(os.getpid())  # this test's processes, and any an earlier test left (a resource tracker)
        assert {parent.pid, *grandchild} <= set(found)
        assert sorted(found) == sorted(p.pid for p in psutil.Process().children(recursive=True))
        with PeakRSS() as memory:
            time.sleep(0.1)
        assert memory.mb > 200 + psutil.Process().memory_info().rss / 2**20
    finally:
        for process in psutil.Process(parent.pid).children(recursive=True) + [psutil.Process(parent.pid)]:
            process.kill()
        parent.wait()


def test_tasks_waiting_for_a_gpu_no_worker_has_are_reported_and_run_once_one_joins(caplog):
    """Resources are read as tasks are submitted, not once: a GPU worker joining later is seen. Tasks that ask
    for a GPU no worker has wait, and the run says so after ``patience`` instead of waiting unseen."""
    import logging

    from distributed import Client, LocalCluster

    from pipelines.engine.cluster import ClusterResources

    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        resources = ClusterResources(client, every=0.1)
        assert "GPU" not in resources.available()
        future = client.submit(int, "42", resources={"GPU": 1}, pure=False)
        with caplog.at_level(logging.WARNING, "pipelines.engine.cluster"), \
                resources.watch(lambda: {"GPU": 0 if future.done() else 1}, patience=0.3, every=0.1):
            deadline = time.time() + 30
            while time.time() < deadline and "need a worker with the GPU resource" not in caplog.text:
                time.sleep(0.05)
            assert "1 task(s) need a worker with the GPU resource and the cluster has had none" in caplog.text
            assert not future.done()
            dask = shutil.which("dask", path=os.path.dirname(sys.executable)) or "dask"
            gpu_worker = subprocess.Popen([dask, "worker", cluster.scheduler_address, "--resources", "GPU=1", "--host",
                                           "127.0.0.1", "--dashboard-address", "127.0.0.1:0"], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                assert future.result(timeout=60) == 42
                deadline = time.time() + 10  # the scheduler's view catches up with the worker that joined
                while time.time() < deadline and "GPU" not in resources.available():
                    time.sleep(0.1)
                assert "GPU" in resources.available()
            finally:
                stop_all([gpu_worker])


def test_a_closed_connection_traceback_is_kept_out_of_the_run_log_unless_verbose(capsys):
    """When the scheduler dies, tornado logs a leftover callback's CommClosedError with its traceback, in a race
    with the runner's own one-line message: the CLI's log leaves it out, and keeps every other error."""
    import logging

    from distributed.comm import CommClosedError

    from pipelines.cli_common import setup_logging

    def log_error(exc: BaseException) -> None:
        try:
            try:
                raise OSError("Stream is closed")
            except OSError as cause:
                raise exc from cause
        except type(exc):
            logging.getLogger("tornado.application").error("Exception in callback", exc_info=True)

    try:
        for verbose in (False, True):
            setup_logging(verbose)
            log_error(CommClosedError("in <TCP (closed) ConnectionPool.gather>"))
            log_error(ValueError("a real bug"))
            printed = capsys.readouterr()
            log = printed.out + printed.err
            assert ("CommClosedError" in log) is verbose and "a real bug" in log
    finally:
        logging.basicConfig(force=True, handlers=[logging.NullHandler()])


def test_qc_waits_for_the_features_read_that_checks_tiles_but_an_earlier_stop_does_not_pull_it_in(tmp_path):
    """With ``slides.verify_tiles: features`` the QC table counts what the teacher's read found, so the qc task waits
    for that slide's features task — for slides with tiles only (an imported store has none) — while `--until qc`
    still stops before any model; with the check in the tiles stage, or none, qc waits for tiles alone."""
    from pipelines.config import RunConfig
    from pipelines.engine.plan import build_plan
    from pipelines.engine.run_dir import RunPaths
    from pipelines.manifest import SlideEntry
    from pipelines.stages.table import STAGES

    entries = [SlideEntry("a", tmp_path / "a.svs", 2, "tumor"), SlideEntry("b", tmp_path / "b.svs", 3, "normal"),
               SlideEntry("imported", None, 4, "normal")]
    tasks = build_plan(STAGES, entries, RunConfig(), RunPaths(tmp_path / "out"))
    assert sorted(tasks["qc/_cohort"].deps) == ["features/a", "features/b", "tiles/a", "tiles/b"]
    assert "features/imported" in tasks  # its store is checked, but it has no tiles for QC to wait on
    early = build_plan(STAGES, entries, RunConfig(), RunPaths(tmp_path / "out"), until="qc")
    assert {t.stage for t in early.values()} == {"tissue", "tiles", "qc"}
    assert sorted(early["qc/_cohort"].deps) == ["tiles/a", "tiles/b"]
    for mode in ("tiles", "off"):
        cfg = RunConfig.model_validate({"slides": {"verify_tiles": mode}})
        assert sorted(build_plan(STAGES, entries, cfg, RunPaths(tmp_path / "out"))["qc/_cohort"].deps) == ["tiles/a", "tiles/b"]
    predict = RunConfig.model_validate({"predict": {"bundle": str(tmp_path)}})  # no features stage: the tiles stage checks
    assert predict.tile_check() == "tiles" and RunConfig().tile_check() == "features"
