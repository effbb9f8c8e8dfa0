"""The viewer in a real headless Chromium on the finished teacher run: list, slide pixels, heatmap, top tile.

Everything is read off the page and its screenshots: the slide list against ``results/predictions.csv``,
the drawn canvas against the slide's own pixels, the heatmap's colours against the planted tumour's
truth mask, and the viewport after a click on the top attention tile.
"""

from __future__ import annotations

import csv
import io
import time
from threading import Thread

import cv2
import numpy as np
import pytest
from browser import available, chromium
from PIL import Image

pytestmark = pytest.mark.skipif(not available(), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
SLIDE = "demo_001"


@pytest.fixture(scope="module")
def page(teacher_run):
    """(slide folder, run directory, driver on the page, server)."""
    from pipelines.viewer.content import ViewerContent
    from pipelines.viewer.run_index import load_run
    from pipelines.viewer.server import ViewerServer

    folder, out, result = teacher_run
    assert result.returncode == 0, result.stderr[-3000:]
    server = ViewerServer(ViewerContent(load_run(out)), port=0)
    server.start()
    with chromium() as driver:
        driver.get(server.url)
        yield folder, out, driver, server
    server.shutdown()
    server.server_close()


def wait(driver, script: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {script}")


def settle(driver) -> None:
    """Until the viewport has stopped moving and every shown layer has drawn its tiles."""
    wait(driver, "const v = window.wsiViewer; return v && !v.isAnimating() && "
                 "[...Array(v.world.getItemCount()).keys()].every(i => v.world.getItemAt(i).getFullyLoaded())")
    time.sleep(0.3)


def canvas_and_coords(driver, step: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(viewer screenshot RGB, element-pixel sample points N×2, their level-0 image coordinates N×2)."""
    element = driver.execute_script("return window.wsiViewer.element")
    shot = np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB"))
    h, w = shot.shape[:2]
    points = np.array([(x, y) for y in range(step // 2, h, step) for x in range(step // 2, w, step)], np.float64)
    coords = driver.execute_script(
        "const v = window.wsiViewer, item = v.world.getItemAt(0);"
        "return arguments[0].map(p => { const q = item.viewerElementToImageCoordinates(new OpenSeadragon.Point(p[0], p[1]));"
        " return [q.x, q.y]; });", points.tolist())
    return shot, points.astype(int), np.array(coords, np.float64)


def sample(mask: np.ndarray, downsample: float, coords: np.ndarray) -> np.ndarray:
    """The mask's value at level-0 ``coords`` (False outside the image)."""
    ix, iy = (coords[:, 0] / downsample).astype(int), (coords[:, 1] / downsample).astype(int)
    inside = (ix >= 0) & (iy >= 0) & (ix < mask.shape[1]) & (iy < mask.shape[0])
    out = np.zeros(len(coords), bool)
    out[inside] = mask[iy[inside], ix[inside]]
    return out


def test_slide_list_shows_every_slide_with_its_prediction(page):
    _, out, driver, _ = page
    with (out / "results" / "predictions.csv").open() as f:
        predicted = {r["slide_id"]: r["prediction"] for r in csv.DictReader(f) if r["strategy"] == "teacher"}
    wait(driver, f"return document.querySelectorAll('#slide-list [data-slide-id]').length === {len(predicted)}")
    shown = driver.execute_script("return [...document.querySelectorAll('#slide-list [data-slide-id]')].map(e => "
                                  "[e.dataset.slideId, e.querySelector('.prediction').textContent.trim()])")
    assert dict(shown) == predicted


def listed(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#slide-list [data-slide-id]')].map(e => e.dataset.slideId)")


def choose(driver, element_id: str, value: str, event: str = "change") -> None:
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event(arguments[2], {bubbles: true}));", element_id, value, event)


def test_list_sorts_and_filters(page):
    _, out, driver, _ = page
    with (out / "results" / "predictions.csv").open() as f:
        rows = {r["slide_id"]: r for r in csv.DictReader(f) if r["strategy"] == "teacher"}
    probability = {k: float(r[f"p_{r['prediction']}"]) for k, r in rows.items()}
    wrong = {k for k, r in rows.items() if r["prediction"] != r["label"]}
    choose(driver, "list-sort", "id")
    assert listed(driver) == sorted(rows)
    choose(driver, "list-sort", "probability")
    assert listed(driver) == sorted(rows, key=lambda k: (-probability[k], k))
    choose(driver, "list-sort", "misclassified")  # the default with labels: wrong first, then by probability
    assert listed(driver) == sorted(rows, key=lambda k: (k not in wrong, -probability[k], k))
    choose(driver, "list-subset", "label:tumor")
    assert sorted(listed(driver)) == sorted(k for k, r in rows.items() if r["label"] == "tumor")
    choose(driver, "list-subset", "misclassified")
    assert set(listed(driver)) == wrong
    choose(driver, "list-subset", "all")
    choose(driver, "list-filter", "demo_01", "input")
    assert listed(driver) == sorted((k for k in rows if k.startswith("demo_01")), key=lambda k: (k not in wrong, -probability[k], k))
    choose(driver, "list-filter", "", "input")
    assert len(listed(driver)) == len(rows)


def test_canvas_draws_the_slides_pixels(page):
    from wsi.slide import open_slide

    folder, _, driver, _ = page
    driver.execute_script(f"document.querySelector('#slide-list [data-slide-id=\"{SLIDE}\"]').click()")
    wait(driver, f"const s = window.wsiViewerState; return s && s.slideId === '{SLIDE}' && s.ready")
    settle(driver)
    shot, points, coords = canvas_and_coords(driver)
    with open_slide(folder / f"{SLIDE}.svs") as slide:
        thumb = slide.read_downsampled(16)
    inside = (coords[:, 0] >= 0) & (coords[:, 1] >= 0) & (coords[:, 0] < thumb.shape[1] * 16 - 16) & (coords[:, 1] < thumb.shape[0] * 16 - 16)
    assert inside.mean() > 0.3
    truth = thumb[(coords[inside, 1] / 16).astype(int), (coords[inside, 0] / 16).astype(int)].astype(float)
    drawn = shot[points[inside, 1], points[inside, 0]].astype(float)
    error = np.abs(drawn - truth).mean()
    flipped = np.abs(drawn - truth[::-1]).mean()  # the same pixels in the wrong places
    assert error < 12 and flipped > 2 * error, (error, flipped)


def test_heatmap_colours_the_planted_tumour(page):
    from wsi.demo_cohort import load_truth

    folder, _, driver, _ = page
    tissue, tumour, meta = load_truth(folder / f"{SLIDE}.svs")
    ds = meta["downsample"]
    core = cv2.erode(tumour.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # away from the border, where the map is blurred
    normal = cv2.erode((tissue & ~cv2.dilate(tumour.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)).astype(np.uint8),
                       np.ones((5, 5), np.uint8)) > 0
    before, _, _ = canvas_and_coords(driver)
    driver.execute_script("const t = document.getElementById('heatmap-toggle'); if (!t.checked) t.click();"
                          "const o = document.getElementById('heatmap-opacity'); o.value = 1;"
                          "o.dispatchEvent(new Event('input', {bubbles: true}));")
    wait(driver, "const s = window.wsiViewerState; return s.heatmapOn && s.heatmapReady")
    settle(driver)
    shot, points, coords = canvas_and_coords(driver)
    hue = cv2.cvtColor(np.ascontiguousarray(shot), cv2.COLOR_RGB2HSV_FULL)[points[:, 1], points[:, 0], 0].astype(float)
    redness = np.minimum(hue, 256 - hue)  # jet: hot red near 0, cold blue near 170
    on_tumour, on_normal = sample(core, ds, coords), sample(normal, ds, coords)
    assert on_tumour.sum() > 50 and on_normal.sum() > 50
    assert redness[on_tumour].mean() + 40 < redness[on_normal].mean(), (redness[on_tumour].mean(), redness[on_normal].mean())
    changed = np.abs(shot.astype(float) - before.astype(float)).sum(axis=2)[points[:, 1], points[:, 0]] > 30
    assert changed[on_tumour | on_normal].mean() > 0.9  # the layer covers the tissue
    off_tissue = ~sample(tissue, ds, coords)
    assert changed[off_tissue].mean() < 0.1  # and leaves the glass alone


def test_clicking_the_top_tile_moves_the_viewport_onto_it(page):
    _, _, driver, _ = page
    wait(driver, "return document.querySelectorAll('#gallery-top img').length > 0")
    tile = driver.execute_script("const i = document.querySelector('#gallery-top img'); i.click();"
                                 "return [+i.dataset.x, +i.dataset.y, +i.dataset.size]")
    settle(driver)
    x, y, w, h = driver.execute_script(
        "const v = window.wsiViewer, r = v.world.getItemAt(0).viewportToImageRectangle(v.viewport.getBounds(true));"
        "return [r.x, r.y, r.width, r.height]")
    cx, cy, size = tile[0] + tile[2] / 2, tile[1] + tile[2] / 2, tile[2]
    assert x <= cx <= x + w and y <= cy <= y + h, (tile, (x, y, w, h))
    assert size <= w <= 8 * size  # zoomed onto the tile, not the whole slide
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_the_static_export_draws_in_a_browser_with_no_missing_file(page, tmp_path):
    """`view --export --max-level` served by a plain static server: the slide and its heatmap draw, zoomed in past
    the last exported level too, and the page asks for no file the export lacks."""
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from pipelines.viewer.export import export_viewer

    _, _, driver, server = page
    dest = tmp_path / "share"
    export_viewer(server.content, dest, [SLIDE], max_level=10)
    missing = []

    class Files(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(dest), **kwargs)

        def send_error(self, code, *args, **kwargs):
            missing.append((code, self.path))
            super().send_error(code, *args, **kwargs)

        def log_message(self, *args) -> None:
            pass

    files = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    Thread(target=files.serve_forever, daemon=True).start()
    try:
        driver.get(f"http://127.0.0.1:{files.server_address[1]}/index.html#slide={SLIDE}")
        wait(driver, f"const s = window.wsiViewerState; return s && s.slideId === '{SLIDE}' && s.ready")
        driver.execute_script("document.getElementById('heatmap-toggle').click()")
        wait(driver, "const s = window.wsiViewerState; return s.heatmapOn && s.heatmapReady")
        driver.execute_script("const v = window.wsiViewer; v.viewport.zoomTo(v.viewport.getMaxZoom(), null, true)")
        settle(driver)
        shot, _, coords = canvas_and_coords(driver)
        assert shot.std() > 5  # pixels drawn, stretched from level 10, not an empty canvas
        assert missing == [], missing[:5]
    finally:
        files.shutdown()
        files.server_close()
