"""The viewer on a realistic slide: deep-zoom tile latency (uncached and cached) and time to the first view.

    python benchmarks/bench_viewer.py [--width 40000] [--tiles 300] [--concurrency 6] [--workdir /tmp/wsi-bench-viewer]

One 40× Aperio demo slide of ``width`` × 3/4·width (tumour planted, truth beside it) goes through the real
``tissue`` and ``tiles`` stages (``wsi-pipeline run --until tiles``); its heatmap is written as the heatmaps
stage writes it (``tiles.csv`` beside ``heatmap.json``), scored from the truth — what is measured is serving,
not a model. Then ``wsi-pipeline view`` serves the run in its own process and:

- uncached: ``--tiles`` distinct random slide tiles of the levels a pathologist browses (the four finest
  DZI levels, where the pyramid is read) and as many heatmap tiles; half fetched one at a time (the service
  time of a tile), half by ``--concurrency`` keep-alive connections at once as a browser asks (Chromium opens
  6 per host: latency then includes queueing on this machine's cores; tiles/s is the throughput);
- cached: the same URLs again, the same two ways;
- first view: Debian's Chromium (when installed) opens the page on the slide and waits until the viewer
  reports its first view drawn (``wsiViewerState.ready``); the time from navigation to then, on a fresh server.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import yaml

from features.precision import cpu_description

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"tissue": {"preset": "bwh_biopsy", "area_reference_mpp": 0.25}, "tiling": {"target_mpp": 0.5, "patch_size": 256}}


def make_run(work: Path, width: int) -> Path:
    """A run directory with one slide through tissue and tiles, a heatmap and a prediction."""
    from wsi.demo_cohort import tumour_tiles, write_demo_slide

    out = work / "run"
    slide = work / "big.svs"
    if not slide.exists():
        write_demo_slide(slide, height=width * 3 // 4, width=width, positive=True, seed=11)
    (work / "slides.csv").write_text(f"slide_path,slide_id,label\n{slide},big,tumor\n")
    (work / "run.yaml").write_text(yaml.safe_dump({**CONFIG, "heatmaps": {"slides": "all"}}))
    subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(work / "slides.csv"), "--config", str(work / "run.yaml"),
                    "--out", str(out), "--until", "tiles"], check=True, capture_output=True)
    coords = np.load(out / "tiles" / "big.coords.npy")
    size = json.loads((out / "tiles" / "big.json").read_text())["level0_size"]
    rng = np.random.default_rng(0)
    score = tumour_tiles(slide, coords, size) * 4.0 + rng.normal(0, 1, len(coords))
    percentile = (np.argsort(np.argsort(score)) + 0.5) / len(score) * 100
    folder = out / "heatmaps" / "teacher" / "big"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "tiles.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "x", "y", "size", "score", "percentile"])
        writer.writerows(["big", int(x), int(y), size, round(float(s), 6), round(float(p), 6)]
                         for (x, y), s, p in zip(coords, score, percentile))
    (folder / "heatmap.json").write_text(json.dumps({"slide_id": "big", "tile_size_level0": size, "predicted": "tumor",
                                                     "probabilities": {"normal": 0.1, "tumor": 0.9}, "fold": 0}))
    (out / "results").mkdir(exist_ok=True)
    (out / "results" / "predictions.csv").write_text("strategy,fold,slide_id,label,prediction,p_normal,p_tumor\n"
                                                     "teacher,0,big,tumor,tumor,0.1,0.9\n")
    return out


def serve(out: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "view", str(out), "--port", "0"], stdout=subprocess.PIPE,
                            text=True)
    while True:
        line = proc.stdout.readline()
        found = re.search(r"(http://127\.0\.0\.1:\d+/)\?token=([\w-]+)", line)
        if found:
            return proc, found.group(0)
        if not line:
            raise RuntimeError("view printed no URL")


def fetch_all(base: str, token: str, urls: list[str], concurrency: int) -> tuple[np.ndarray, float]:
    """(latency per request in ms, seconds for all): ``concurrency`` keep-alive connections, as a browser's."""
    host, port = urlsplit(base).hostname, urlsplit(base).port

    def worker(part: list[str]) -> list[float]:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        times = []
        for url in part:
            start = time.perf_counter()
            conn.request("GET", f"/{url}?token={token}")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{url}: HTTP {response.status}")
            times.append((time.perf_counter() - start) * 1000)
        conn.close()
        return times

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        parts = list(pool.map(worker, [urls[i::concurrency] for i in range(concurrency)]))
    return np.array([t for part in parts for t in part]), time.perf_counter() - start


def first_view(url: str) -> float | None:
    """Seconds from navigation to the viewer's first view drawn, in Debian's Chromium (None without it)."""
    if not Path("/usr/bin/chromium").exists():
        return None
    sys.path.insert(0, str(ROOT / "tests"))
    from browser import chromium

    with chromium() as driver:
        start = time.perf_counter()
        driver.get(url + "#slide=big")
        while not driver.execute_script("return !!(window.wsiViewerState && window.wsiViewerState.ready)"):
            if time.perf_counter() - start > 60:
                raise RuntimeError("no first view within 60 s")
            time.sleep(0.02)
        return time.perf_counter() - start


def line(name: str, ms: np.ndarray) -> str:
    return f"| {name} | {len(ms)} | {np.percentile(ms, 50):.1f} | {np.percentile(ms, 95):.1f} | {ms.max():.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=40_000)
    parser.add_argument("--tiles", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsi-bench-viewer"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from wsi.deepzoom import DziGeometry

    out = make_run(args.workdir, args.width)
    geometry = DziGeometry(args.width, args.width * 3 // 4)
    rng = random.Random(0)
    slide_urls, heat_urls = [], []
    for level in range(geometry.max_level - 3, geometry.max_level + 1):
        cols, rows = geometry.tile_count(level)
        picks = rng.sample([(c, r) for c in range(cols) for r in range(rows)], min(cols * rows, args.tiles // 4))
        slide_urls += [f"slide/big_files/{level}/{c}_{r}.jpeg" for c, r in picks]
        heat_urls += [f"heatmap/teacher/big_files/{level}/{c}_{r}.png" for c, r in picks]
    rng.shuffle(slide_urls)
    rng.shuffle(heat_urls)
    half = len(slide_urls) // 2
    proc, url = serve(out)
    try:
        base, token = url.split("?token=")
        fetch_all(base, token, ["api/slides.json", "slide/big_files/0/0_0.jpeg", "heatmap/teacher/big_files/0/0_0.png"], 1)
        rows = []
        for name, urls in [("slide", slide_urls), ("heatmap", heat_urls)]:
            one, _ = fetch_all(base, token, urls[:half], 1)  # one request at a time: the service time
            many, seconds = fetch_all(base, token, urls[half:], args.concurrency)  # as a browser asks: throughput
            again, _ = fetch_all(base, token, urls[:half], 1)
            again_many, cached_seconds = fetch_all(base, token, urls[half:], args.concurrency)
            rows += [(f"{name} tiles, uncached, 1 connection", one, None),
                     (f"{name} tiles, uncached, {args.concurrency} connections", many, len(many) / seconds),
                     (f"{name} tiles, cached, 1 connection", again, None),
                     (f"{name} tiles, cached, {args.concurrency} connections", again_many, len(again_many) / cached_seconds)]
    finally:
        proc.terminate()
    proc, url = serve(out)  # a fresh server: nothing cut, nothing cached
    try:
        seconds = first_view(url)
    finally:
        proc.terminate()
    print(f"CPU: {cpu_description()}; slide {args.width} × {args.width * 3 // 4} (DZI levels 0..{geometry.max_level}), "
          f"{args.concurrency} connections at once")
    print("\n| requests | n | p50 ms | p95 ms | max ms | tiles/s |\n|---|---|---|---|---|---|")
    for name, ms, rate in rows:
        print(line(name, ms) + (f" {rate:.0f} |" if rate else " |"))
    print(f"\nfirst view (Chromium, fresh server, navigation → first view drawn): "
          f"{'not measured (no /usr/bin/chromium)' if seconds is None else f'{seconds:.2f} s'}")


if __name__ == "__main__":
    main()
