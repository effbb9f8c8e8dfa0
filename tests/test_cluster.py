"""The whole pipeline on real multi-process Dask clusters, as users run it on theirs: `dask scheduler` and two
`dask worker` processes started by the CLI with default settings, each in its own working directory; and
dask-jobqueue, whose LocalCluster runs real job scripts as local processes (the code path of SLURMCluster).
Both start daemonic worker processes, which may not start DataLoader processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

CLI = [sys.executable, "-m", "pipelines.cli"]
FINISHED: dict[str, Path] = {}  # cluster kind → its finished run, to compare the runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_input(tmp_path_factory) -> Path:
    """A 4-slide demo cohort and a short run config in which every slide's tiles go through loader workers."""
    folder = tmp_path_factory.mktemp("cluster_input")
    done = subprocess.run([*CLI, "demo", "demo", "--n-slides", "4", "--size", "4096"], cwd=folder, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load((folder / "demo" / "run.yaml").read_text())
    config["features"]["loader_min_tiles"] = 1  # every slide read by loader workers
    config["distill"].update(epochs=2, tiles_per_epoch=64, max_val_tiles=32, num_workers=1)
    config["mil"].update(strategies=["teacher", "reuse"], max_epochs=3, min_epochs=1)
    config["heatmaps"] = {"slides": "all", "width": 512, "top_k": 1}
    (folder / "demo" / "run.yaml").write_text(yaml.safe_dump(config))
    return folder


def run_pipeline(folder: Path, address: str, out: str) -> subprocess.CompletedProcess:
    """``wsi-pipeline run`` on the cluster at ``address``, with paths relative to ``folder`` (the workers' own
    working directories are elsewhere)."""
    return subprocess.run([*CLI, "run", "demo/slides.csv", "--config", "demo/run.yaml", "--out", out,
                           "--scheduler", address], cwd=folder, capture_output=True, text=True, timeout=900)


def assert_every_task_done(out: Path, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    states = [json.loads(p.read_text()) for p in (out / "state").glob("*/*.json")]
    assert {s["status"] for s in states} == {"done"}
    stages = {p.parent.name for p in (out / "state").glob("*/*.json")}
    assert {"tissue", "tiles", "features", "distill", "student_features", "mil", "results", "heatmaps"} <= stages
    for slide in ("demo_000", "demo_001", "demo_002", "demo_003"):
        meta = json.loads((out / "state" / "features" / f"{slide}.json").read_text())["meta"]
        assert meta["loader"] == "threads", meta  # a daemonic worker: loader threads, not processes
        assert meta["n_tiles"] > 0
    assert json.loads((out / "state" / "distill" / "_cohort.json").read_text())["meta"]["loader"] == "threads"


def assert_features_match_a_local_extraction(folder: Path, out: Path, slide_id: str) -> None:
    """The cluster's features of one slide, read by threads in a daemonic worker, equal those read in this
    process without loader workers: the same tiles, in the same order."""
    import zarr

    from pipelines.config import load_config
    from pipelines.engine.run_dir import RunPaths
    from pipelines.manifest import read_manifest
    from pipelines.stages.features import features_stage

    local = RunPaths(out.parent / "local")
    for part in ("tissue", "tiles"):
        shutil.copytree(out / part, local.root / part)
    config = load_config(out / "run.yaml")
    config.features.num_workers = 0
    (entry,) = [e for e in read_manifest(folder / "demo" / "slides.csv") if e.slide_id == slide_id]
    features_stage(entry, config, local)
    label = config.features.teacher.label
    ours = zarr.open_group(str(out / "features" / label / f"{slide_id}.zarr"), mode="r")
    theirs = zarr.open_group(str(local.root / "features" / label / f"{slide_id}.zarr"), mode="r")
    assert np.array_equal(ours["coords"][:], theirs["coords"][:])
    assert np.array_equal(ours["features"][:], theirs["features"][:])


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_the_pipeline_on_dask_scheduler_and_two_dask_workers(demo_input, tmp_path):
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = shutil.which("dask", path=os.path.dirname(sys.executable)) or "dask"
    homes = [tmp_path / name for name in ("scheduler", "worker-a", "worker-b")]
    for home in homes:
        home.mkdir()
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", "127.0.0.1:0"], cwd=homes[0], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        for home in homes[1:]:  # default settings: a nanny, as many threads as cores, a daemonic worker process
            procs.append(subprocess.Popen([dask, "worker", address, "--host", "127.0.0.1", "--dashboard-address",
                                           "127.0.0.1:0"], cwd=home, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=60)
        out = tmp_path / "run"
        result = run_pipeline(demo_input, address, str(out))
        assert_every_task_done(out, result)
        assert_features_match_a_local_extraction(demo_input, out, "demo_001")
        FINISHED["dask worker"] = out
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
        try:
            with Client(address, timeout="60s") as client:  # Dask's nanny set the malloc tunable; the run's plugin undid it
                assert set(client.run(malloc_trim_threshold).values()) == {"65536"}
                assert max(client.run(heap_page_faults).values()) < 5_000
        finally:
            cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    finally:
        stop(procs)


def malloc_trim_threshold() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")  # read where it runs (os.environ.get would pickle this one)


def heap_page_faults(n: int = 200, size: int = 1 << 20) -> int:
    """Minor page faults while ``n`` arrays of ``size`` bytes are made and freed one after another: about
    ``n × size / 4096`` when each is mapped afresh, a few hundred when the heap keeps the memory for the next."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        np.ones(size, dtype=np.uint8)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_malloc_as_dask_workers_start_maps_every_large_array_afresh_until_the_heap_is_kept():
    code = ("from test_cluster import heap_page_faults as f; from pipelines.engine.cluster import "
            "keep_large_allocations_on_the_heap as keep; print(f(), keep(), f())")
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536", "PYTHONPATH": str(Path(__file__).parent)}
    before, kept, after = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                         check=True).stdout.split()
    assert int(before) > 40_000 and kept == "True" and int(after) < 5_000
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # a user's own setting is kept
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.split()[1] == "False"


def task_page_faults(rounds: int = 4) -> list[int]:
    """Minor page faults of each of ``rounds`` runs of a tissue-task-like allocation pattern in a pool thread (as
    Dask runs tasks): a 14 MiB overview and 5 MiB temporaries, ~40 MiB live, some freed early, a result kept to
    the end; then freed."""
    import resource
    from concurrent.futures import ThreadPoolExecutor

    def task() -> int:
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        image, temporaries = np.ones(14 << 20, np.uint8), []
        for i in range(12):
            temporaries.append(np.ones((5 << 20) + i * 4096, np.uint8))
            if i % 3 == 2:
                temporaries.pop(0)
        result = np.ones(5 << 20, np.uint8)
        del image, temporaries, result
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before

    with ThreadPoolExecutor(1) as pool:
        return [pool.submit(task).result() for _ in range(rounds)]


def test_a_worker_thread_keeps_its_heap_for_the_next_task():
    """glibc unmaps a thread arena's heap once it is empty; the top pad keeps it, so a task's pages fault once per
    worker, not once per task. Against the same thresholds without the pad, and with a pad the user set kept."""
    code = ("import ctypes, os, sys; from test_cluster import task_page_faults as f; "
            "from pipelines.engine.cluster import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, MMAP_THRESHOLD, TRIM_THRESHOLD, "
            "keep_large_allocations_on_the_heap as keep; mallopt = ctypes.CDLL('libc.so.6').mallopt; "
            "how = sys.argv[1]; "
            "ok = keep() if how == 'keep' else (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and "
            "mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)); print(bool(ok), *f())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(Path(__file__).parent)

    def run(how: str, **extra: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", code, how], env={**env, **extra}, capture_output=True, text=True,
                             check=True).stdout.split()
        assert out[0] == "True"
        return [int(n) for n in out[2:]]  # after the first task

    kept, thresholds_only = run("keep"), run("thresholds")
    assert max(kept) < 100, kept
    assert min(thresholds_only) > 10 * max(kept) + 500, thresholds_only  # the same tasks fault again each time
    assert min(run("keep", MALLOC_TOP_PAD_="0")) > 500  # the user's own pad is left as it is


def test_the_pipeline_on_dask_jobqueue(demo_input, tmp_path):
    from dask_jobqueue.local import LocalCluster
    from distributed import Client

    with LocalCluster(cores=1, processes=1, memory="6GiB", local_directory=str(tmp_path / "jobs"),
                      scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
                      worker_extra_args=["--host", "127.0.0.1"]) as cluster, Client(cluster) as client:
        cluster.scale(2)
        client.wait_for_workers(2, timeout=120)
        out = tmp_path / "run"
        result = run_pipeline(demo_input, cluster.scheduler_address, str(out))
        assert_every_task_done(out, result)
    if "dask worker" in FINISHED:
        assert_same_results(FINISHED["dask worker"], out)


def assert_same_results(a: Path, b: Path) -> None:
    """Two clusters, one result: `dask worker`'s two threads per worker (model tasks one at a time per process,
    never reseeding each other) and dask-jobqueue's one give the same features, student and predictions."""
    import zarr

    for name in ("results/predictions.csv", "models/student/student.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    stores = sorted(p.relative_to(a) for p in a.glob("features/*/*.zarr"))
    assert len(stores) == 8
    for store in stores:
        assert np.array_equal(zarr.open_group(str(a / store), mode="r")["features"][:],
                              zarr.open_group(str(b / store), mode="r")["features"][:]), store


def test_a_task_alone_on_an_external_cluster_takes_only_the_cores_its_workers_hold_on_the_host():
    """A worker given fewer threads than the node's affinity mask (no cpuset: `dask worker --nthreads 1` on a
    shared node) must not have an alone task take the whole node; a local cluster's alone task takes the machine."""
    from distributed import Client, LocalCluster

    from pipelines.engine.cluster import alone_cores, machine_cores

    # in-process workers on Dask's inproc transport: no socket is bound at all
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        assert client.submit(alone_cores, True, pure=False).result() == 1
        assert client.submit(alone_cores, False, pure=False).result() == machine_cores()
        cluster.scale(2)
        client.wait_for_workers(2, timeout=30)
        assert client.submit(alone_cores, True, pure=False).result() == min(2, machine_cores())
    assert alone_cores(True) == machine_cores()  # outside a worker: the machine
