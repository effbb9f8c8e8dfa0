"""`wsi-pipeline view`: the real command serving the teacher run over HTTP — what it serves and what it refuses."""

from __future__ import annotations

import csv
import http.client
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest

from wsi.deepzoom import DziGeometry
from wsi.slide import open_slide


@pytest.fixture(scope="module")
def served(teacher_run):
    """(run directory, port, token, server process): `wsi-pipeline view OUT --port 0` as a user starts it."""
    _, out, result = teacher_run
    assert result.returncode == 0, result.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "view", str(out), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = None
    deadline = time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=([\w-]+)", line or "")
        if not line and proc.poll() is not None:
            raise AssertionError(f"view exited: {proc.stderr.read()[-2000:]}")
    assert url is not None, "view printed no URL"
    yield out, int(url.group(1)), url.group(2), proc
    proc.terminate()
    proc.wait(10)


def get(port: int, path: str, *, host: str | None = None, cookie: str | None = None, method: str = "GET"):
    """(status, headers, body); ``host=""``: no Host header at all."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    if host != "":
        conn.putheader("Host", host or f"127.0.0.1:{port}")
    if cookie:
        conn.putheader("Cookie", cookie)
    conn.endheaders()
    response = conn.getresponse()
    return response.status, dict(response.getheaders()), response.read()


def test_binds_loopback_only_and_guards_with_token_and_host(served):
    out, port, token, proc = served
    bound = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert bound and all(addr.ip == "127.0.0.1" for addr in bound), bound
    assert get(port, "/")[0] == 403
    assert get(port, "/api/slides")[0] == 403
    assert get(port, f"/?token={token}x")[0] == 403
    status, headers, body = get(port, f"/?token={token}")  # the page: the cookie set, the token off the address bar
    assert status == 302 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"].split(";")[0]
    assert cookie == f"wsi_viewer_token_{port}={token}"  # named by the port: two viewers keep their own
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    status, _, body = get(port, "/", cookie=cookie)
    assert status == 200 and b"openseadragon" in body.lower()
    assert get(port, "/api/slides", cookie=cookie)[0] == 200  # the cookie alone, as the page's own requests
    assert get(port, "/api/slides", cookie=f'a={{"x":1}}; b c=d; {cookie}')[0] == 200  # behind other apps' odd cookies
    assert get(port, "/api/slides", cookie=f"wsi_viewer_token_{port}=")[0] == 403
    assert get(port, "/api/slides", cookie=f"wsi_viewer_token_{port + 1}={token}")[0] == 403
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host, token or not
    for host in ["evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""]:
        assert get(port, f"/api/slides?token={token}", host=host)[0] == 403, host
    for host in [f"localhost:{port}", "LOCALHOST:9000", "127.0.0.1:9000", "127.0.0.1"]:  # a tunnel forwards from its port
        assert get(port, f"/api/slides?token={token}", host=host)[0] == 200, host
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PROPFIND"):
        assert get(port, f"/api/slides?token={token}", method=method)[0] == 405, method


def test_paths_outside_the_run_and_absurd_tiles_are_404(served):
    out, port, token, _ = served
    slide = "demo_001"
    for path in ["/../../etc/passwd", "//etc/passwd", "/etc/passwd", "/slide/..%2F..%2Fetc%2Fpasswd.dzi",
                 f"/slide/{out}/manifest.csv", "/run.yaml", "/manifest.csv", "/slide/nope.dzi", "/slide/nope_files/0/0_0.jpeg",
                 f"/slide/{slide}_files/99/0_0.jpeg", f"/slide/{slide}_files/13/9999_0.jpeg", f"/slide/{slide}_files/-1/0_0.jpeg",
                 f"/slide/{slide}_files/13/0_0.png", f"/heatmap/nope/{slide}.dzi", f"/heatmap/teacher/{slide}_files/40/0_0.png",
                 f"/api/slides/{slide}/attention/teacher/top/999.jpeg", "/api/slides/../run.yaml", "/openseadragon/",
                 "/openseadragon/images/", "/static/"]:
        status, headers, body = get(port, f"{path}?token={token}")
        assert status == 404, (path, status, body[:200])
        assert b"Traceback" not in body


def test_slide_list_dzi_and_tiles_match_the_run(served, teacher_run):
    folder, _, _ = teacher_run
    out, port, token, _ = served
    status, _, body = get(port, f"/api/slides?token={token}")
    document = json.loads(body)
    with (out / "results" / "predictions.csv").open() as f:
        predicted = {r["slide_id"]: r for r in csv.DictReader(f)}
    assert [s["id"] for s in document["slides"]] == sorted(predicted)
    assert document["run"]["strategies"] == ["teacher"] and document["run"]["kind"] == "train"
    for s in document["slides"]:
        row = predicted[s["id"]]
        assert s["predictions"]["teacher"]["prediction"] == row["prediction"]
        assert s["predictions"]["teacher"]["correct"] == (row["prediction"] == row["label"])
        assert set(s["heatmaps"]) == {"teacher"}
    slide = next(s for s in document["slides"] if s["id"] == "demo_001")
    status, _, xml = get(port, f"/slide/demo_001.dzi?token={token}")
    assert status == 200 and f'Width="{slide["width"]}"'.encode() in xml and b'TileSize="254"' in xml
    geometry = DziGeometry(slide["width"], slide["height"])
    # each tile shows its own place of the slide: its pixels (up to JPEG) at full resolution, the pyramid's below;
    # the same box one tile to the right differs several times more
    with open_slide(folder / "demo_001.svs") as reader:
        for level, col, row in [(geometry.max_level, 12, 10), (geometry.max_level - 2, 3, 2), (geometry.max_level - 4, 1, 1)]:
            status, headers, data = get(port, f"/slide/demo_001_files/{level}/{col}_{row}.jpeg?token={token}")
            assert status == 200 and headers["Content-Type"] == "image/jpeg"
            tile = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].astype(float)

            error = np.abs(tile - pyramid_box(reader, geometry, level, col, row, 0, tile.shape)).mean()
            shifted = np.abs(tile - pyramid_box(reader, geometry, level, col, row, 254 * geometry.scale(level), tile.shape)).mean()
            assert error < 5 and shifted > 3 * error, (level, error, shifted)


def pyramid_box(reader, geometry: DziGeometry, level: int, col: int, row: int, shift: int, shape: tuple) -> np.ndarray:
    """A DZI tile's box (moved ``shift`` level-0 px right) read from the slide's own pyramid, at the tile's size."""
    x0, y0, x1, y1 = geometry.level0_box(level, col, row)
    at = reader.best_level_for_downsample(geometry.scale(level))
    ds = reader.level_downsamples[at]
    pixels = reader.read_region((int(x0 + shift), int(y0)), at, (round((x1 - x0) / ds), round((y1 - y0) / ds)))
    return cv2.resize(pixels, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def test_heatmap_tiles_are_hot_on_the_tumour_and_clear_off_tissue(served, teacher_run):
    from wsi.demo_cohort import load_truth

    folder, _, _ = teacher_run
    out, port, token, _ = served
    _, tumour, meta = load_truth(folder / "demo_001.svs")
    geometry = DziGeometry(*meta_size(out, "demo_001"))
    level = geometry.max_level - 5  # 1/32: the whole slide in one or two tiles
    cols, rows = geometry.tile_count(level)
    canvas = np.zeros((*reversed(geometry.level_size(level)), 4), np.uint8)
    for r in range(rows):
        for c in range(cols):
            status, headers, data = get(port, f"/heatmap/teacher/demo_001_files/{level}/{c}_{r}.png?token={token}")
            assert status == 200 and headers["Content-Type"] == "image/png"
            tile = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            x0, y0, x1, y1 = geometry.tile_box(level, c, r)
            canvas[y0:y1, x0:x1] = tile[..., [2, 1, 0, 3]]
    truth = cv2.resize(tumour.astype(np.uint8), (canvas.shape[1], canvas.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    shown = canvas[..., 3] > 0
    assert shown.mean() > 0.05 and not shown[:3, :3].any()  # drawn over tissue only: the corner is glass
    hue = cv2.cvtColor(np.ascontiguousarray(canvas[..., :3]), cv2.COLOR_RGB2HSV_FULL)[..., 0].astype(float)
    redness = np.minimum(hue, 256 - hue)  # jet: red (hot) near 0, blue (cold) near 170
    assert redness[truth & shown].mean() + 40 < redness[~truth & shown].mean()


def meta_size(out: Path, slide_id: str) -> tuple[int, int]:
    return tuple(json.loads((out / "tissue" / f"{slide_id}.json").read_text())["dimensions"])


def test_static_export_of_one_slide_is_the_servers_answers(served, tmp_path):
    out, port, token, _ = served
    dest = tmp_path / "share"
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "view", str(out), "--export", str(dest), "--slide",
                             "demo_001", "--max-level", "9"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    document = json.loads((dest / "api" / "slides.json").read_text())
    assert [s["id"] for s in document["slides"]] == ["demo_001"] and document["slides"][0]["dzi"]["max_level"] == 9
    geometry = DziGeometry(*meta_size(out, "demo_001"))
    for level in range(10):
        cols, rows = geometry.tile_count(level)
        assert len(list((dest / "slide" / "demo_001_files" / str(level)).glob("*.jpeg"))) == cols * rows
        assert len(list((dest / "heatmap" / "teacher" / "demo_001_files" / str(level)).glob("*.png"))) == cols * rows
    assert not (dest / "slide" / "demo_001_files" / "10").exists() and not (dest / "slide" / "demo_002.dzi").exists()
    for path in ["slide/demo_001_files/9/1_1.jpeg", "heatmap/teacher/demo_001_files/8/0_0.png", "index.html",
                 "api/slides/demo_001/attention/teacher/top/1.jpeg", "api/slides/demo_001/tissue.geojson"]:
        assert (dest / path).read_bytes() == get(port, f"/{path}", cookie=f"wsi_viewer_token_{port}={token}")[2], path
    for args, says in [(["--export", str(tmp_path / "x"), "--slide", "nope"], "nope"),
                       (["--export", str(dest)], "not empty"), (["--export", str(tmp_path / "y"), "--max-level", "-1"], "-1"),
                       (["--token", "short"], "16 characters")]:
        bad = subprocess.run([sys.executable, "-m", "pipelines.cli", "view", str(out), *args], capture_output=True, text=True,
                             timeout=120)
        text = " ".join(bad.stderr.replace("│", " ").split())  # rich boxes and wraps the message
        assert bad.returncode == 2 and says in text, (args, text[-500:])


def test_dzi_geometry_covers_every_level_once_with_overlap():
    geometry = DziGeometry(40_000, 30_000)
    assert geometry.max_level == 16 and geometry.level_size(16) == (40_000, 30_000) and geometry.level_size(0) == (1, 1)
    assert geometry.level_size(9) == (313, 235) and geometry.tile_count(9) == (2, 1)
    assert geometry.tile_box(16, 0, 0) == (0, 0, 255, 255)  # first tile: overlap on the far sides only
    assert geometry.tile_box(16, 1, 1) == (253, 253, 509, 509)
    cols, rows = geometry.tile_count(16)
    assert geometry.tile_box(16, cols - 1, rows - 1)[2:] == (40_000, 30_000)  # the last is cut at the image's edge
    assert geometry.level0_box(14, 2, 0) == (507 * 4, 0, 763 * 4, 255 * 4)
    for bad in [(17, 0, 0), (-1, 0, 0), (16, cols, 0), (16, 0, rows), (9, 2, 0)]:
        with pytest.raises(KeyError):
            geometry.tile_box(*bad)
    assert DziGeometry(1, 1).max_level == 0 and DziGeometry(1, 1).tile_count(0) == (1, 1)
