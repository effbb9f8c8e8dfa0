// wsi-pipeline viewer: slide list, OpenSeadragon view (slide + heatmap + tissue/grid overlay), side panel.
// Data: api/slides.json and the files it points to. Every URL is relative, so the same page works behind
// the server and in a static export.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const state = (window.wsiViewerState = {
    slideId: null, strategy: null, heatmapOn: false, ready: false, heatmapReady: false, error: null });
  let run = {}, slides = [], byId = new Map();
  let slide = null, slideItem = null; // the open slide's JSON and its TiledImage
  let heatmap = null; // {item, check} of the heatmap layer, {} while being added; hidden = opacity 0
  let openSeq = 0, gallerySeq = 0; // bumped per request: late answers for an earlier slide are dropped
  let overlayData = { tissue: null, tiles: null, focus: null };
  let tileErrors = 0, messageTimer = null;

  const viewer = (window.wsiViewer = OpenSeadragon({
    id: "viewer", prefixUrl: "openseadragon/images/",
    drawer: "canvas", // headless Chromium has no GPU
    crossOriginPolicy: false,
    showNavigator: true, navigatorPosition: "BOTTOM_RIGHT", showRotationControl: false,
    visibilityRatio: 0.5, minZoomImageRatio: 0.5, maxZoomPixelRatio: 4,
    gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true }, // a single click is for looking
  }));

  // ---------- helpers ----------
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v == null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.includes("-") || k === "role" || k === "style") node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) if (c != null) node.append(c);
    return node;
  }

  async function fetchJSON(url) {
    const response = await fetch(url, { credentials: "same-origin" }); // the server's token cookie
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }
  // {data} or {error}: each caller says in its own place what failed.
  const tryJSON = (url) => fetchJSON(url).then((data) => ({ data }), (err) => ({ error: err.message }));

  // One status line in the header: a problem is always said on the page, never a silent blank view.
  function showMessage(text, kind = "error") {
    clearTimeout(messageTimer);
    Object.assign($("message"), { hidden: !text, textContent: text || "", className: kind });
    if (kind === "error" && text) state.error = text;
    if (kind === "info" && text) messageTimer = setTimeout(() => showMessage(null), 5000);
  }
  window.addEventListener("error", (e) => showMessage(`Page error: ${e.message}`));
  window.addEventListener("unhandledrejection", (e) => showMessage(`Page error: ${e.reason}`));

  const viewerMessage = (text) => Object.assign($("viewer-message"), { hidden: !text, textContent: text || "" });

  const fmt = (p, digits = 2) => (typeof p === "number" ? p.toFixed(digits) : "");
  const mark = (correct) => (correct === true ? "✓" : correct === false ? "✗" : "");
  const correctClass = (correct) => "correct " + (correct === false ? "wrong" : "right");
  const hasLabels = () => slides.some((s) => s.label != null);

  // Inline DZI descriptor: no .dzi request, and the page does not depend on those files.
  // A DZI built from the JSON (no .dzi fetch). An export cut with --max-level stops at max_level: OpenSeadragon
  // would take that level for full resolution, so each level keeps its own scale (it stretches the last one).
  const dziSource = (dzi) => {
    const full = Math.ceil(Math.log2(Math.max(dzi.width, dzi.height)));
    const source = new OpenSeadragon.DziTileSource({
      width: dzi.width, height: dzi.height, tileSize: dzi.tile_size, tileOverlap: dzi.overlap,
      tilesUrl: dzi.url, fileFormat: dzi.format, minLevel: 0, maxLevel: Math.min(dzi.max_level ?? full, full),
      queryParams: run.version ? `?v=${run.version}` : "", // a rerun's tiles, never the browser's cached ones
    });
    source.getLevelScale = (level) => 1 / Math.pow(2, full - level);
    return source;
  };

  // A train run keys predictions by strategy; a predict run has a single key (e.g. "bundle").
  function predictionOf(s) {
    const preds = (s && s.predictions) || {};
    const keys = Object.keys(preds);
    return state.strategy in preds ? preds[state.strategy] : keys.length === 1 ? preds[keys[0]] : null;
  }
  const probabilityOf = (p) => (p && p.probabilities ? p.probabilities[p.prediction] : undefined);

  function heatmapOf(s) {
    const maps = (s && s.heatmaps) || {};
    return (state.strategy != null ? maps[state.strategy] : Object.values(maps)[0]) || null;
  }

  // ---------- slide list ----------
  function setupListControls() {
    const labels = new Set([...(run.classes || []), ...slides.map((s) => s.label).filter((l) => l != null)]);
    const subset = $("list-subset");
    subset.append(el("option", { value: "all", text: "All slides" }));
    if (hasLabels()) {
      subset.append(el("option", { value: "misclassified", text: "Misclassified" }),
        el("option", { value: "correct", text: "Correct" }));
      for (const l of labels) subset.append(el("option", { value: "label:" + l, text: "Label: " + l }));
    }
    // Without labels "misclassified" means nothing: a predict run sorts by probability.
    $("list-sort").querySelector('[value="misclassified"]').disabled = !hasLabels();
    $("list-sort").value = hasLabels() ? "misclassified" : "probability";
    $("list-filter").addEventListener("input", renderList);
    for (const id of ["list-subset", "list-sort"]) $(id).addEventListener("change", renderList);
  }

  function visibleSlides() {
    const text = $("list-filter").value.trim().toLowerCase();
    const subset = $("list-subset").value;
    const rows = slides.filter((s) => {
      if (text && !`${s.id} ${s.case || ""}`.toLowerCase().includes(text)) return false;
      const p = predictionOf(s);
      if (subset === "misclassified") return p && p.correct === false;
      if (subset === "correct") return p && p.correct === true;
      return subset.startsWith("label:") ? s.label === subset.slice(6) : true;
    });
    const byIdCmp = (a, b) => a.id.localeCompare(b.id, undefined, { numeric: true });
    const prob = (s) => probabilityOf(predictionOf(s)) ?? -1;
    const wrongRank = (s) => ({ false: 0, true: 1 })[String((predictionOf(s) || {}).correct)] ?? 2;
    const cmp = {
      misclassified: (a, b) => wrongRank(a) - wrongRank(b) || prob(b) - prob(a) || byIdCmp(a, b),
      probability: (a, b) => prob(b) - prob(a) || byIdCmp(a, b),
      label: (a, b) => (a.label ?? "\uffff").localeCompare(b.label ?? "\uffff") || byIdCmp(a, b),
    }[$("list-sort").value] || byIdCmp;
    return rows.sort(cmp);
  }

  function renderList() {
    const rows = visibleSlides();
    $("slide-list").replaceChildren(...rows.map((s) => {
      const p = predictionOf(s) || {};
      const prob = probabilityOf(p);
      return el("div", { class: "slide-row" + (s.id === state.slideId ? " active" : ""), "data-slide-id": s.id,
        tabIndex: 0, role: "option", title: s.case ? `case ${s.case}` : null },
      el("div", { class: "row-top" }, el("span", { class: "slide-id", text: s.id }),
        s.status && s.status !== "ok" ? el("span", { class: "status-badge", text: s.status }) : null,
        el("span", { class: correctClass(p.correct), text: mark(p.correct) })),
      el("div", { class: "row-bottom" }, el("span", { class: "label", text: s.label ?? "" }),
        p.prediction != null ? el("span", { class: "arrow", text: "→" }) : null,
        el("span", { class: "prediction", text: p.prediction ?? "" }),
        el("span", { class: "probability", text: fmt(prob), "data-value": prob })));
    }));
    const none = slides.length ? "No slide matches." : "No slides in this run.";
    if (!rows.length) $("slide-list").append(el("p", { class: "muted", text: none }));
    $("list-count").textContent = `${rows.length} of ${slides.length} slides`;
  }

  // The hash keeps the open slide, so a link (or the back button) opens it.
  const goTo = (id) => { location.hash = "slide=" + encodeURIComponent(id); };
  const slideFromHash = () => new URLSearchParams(location.hash.slice(1)).get("slide");
  window.addEventListener("hashchange", () => {
    const id = slideFromHash();
    if (id && id !== state.slideId) openSlide(id);
  });
  $("slide-list").addEventListener("click", (e) => {
    const row = e.target.closest("[data-slide-id]");
    if (row) goTo(row.dataset.slideId);
  });
  $("slide-list").addEventListener("keydown", (e) => { // up/down walk the list, like a listbox
    const row = e.target.closest("[data-slide-id]");
    const next = row && { ArrowDown: row.nextElementSibling, ArrowUp: row.previousElementSibling, Enter: row }[e.key];
    if (next && next.dataset.slideId) { e.preventDefault(); next.focus(); goTo(next.dataset.slideId); }
  });

  // ---------- opening a slide: everything per slide is reset ----------
  function openSlide(id) {
    const s = byId.get(id);
    if (!s) return showMessage(`Slide "${id}" is not in this run.`);
    const seq = ++openSeq;
    slide = s;
    slideItem = heatmap = null;
    overlayData = { tissue: null, tiles: null, focus: null };
    tileErrors = 0;
    Object.assign(state, { slideId: id, ready: false, heatmapOn: false, heatmapReady: false });
    for (const t of ["heatmap-toggle", "tissue-toggle", "grid-toggle"]) $(t).checked = false;
    $("tissue-legend").hidden = true;
    showMessage(null);
    for (const row of document.querySelectorAll(".slide-row")) row.classList.toggle("active", row.dataset.slideId === id);
    renderInfo();
    renderGallery();
    updateHeatmapControls();
    drawOverlay();
    viewerMessage(s.dzi ? null : `This slide has no image to show (status: ${s.status || "unknown"}).`);
    $("viewer-wrap").classList.toggle("empty", !s.dzi); // no navigator box over nothing
    if (!s.dzi) return viewer.close();
    viewer.open({
      tileSource: dziSource(s.dzi),
      success: (e) => {
        if (seq !== openSeq) return;
        slideItem = e.item;
        whenDrawn(e.item, () => { if (e.item === slideItem) state.ready = true; });
        if (state.heatmapOn) setHeatmap(true); // switched on before the slide was there
        drawOverlay();
      },
      error: (e) => { if (seq === openSeq) viewerMessage(`Could not open the slide: ${e.message || "unknown error"}`); },
    });
  }

  // fully-loaded-change fires before the frame is painted; two animation frames later the tiles are on screen.
  function whenDrawn(item, onDrawn, onUnloaded) {
    const check = () => requestAnimationFrame(() => requestAnimationFrame(() => { if (item.getFullyLoaded()) onDrawn(); }));
    item.addHandler("fully-loaded-change", (e) => (e.fullyLoaded ? check() : onUnloaded && onUnloaded()));
    if (item.getFullyLoaded()) check();
    return check;
  }

  viewer.addHandler("tile-load-failed", () => {
    tileErrors += 1;
    showMessage(`${tileErrors} image tile(s) failed to load; parts of the view may be missing.`);
  });

  // ---------- heatmap ----------
  function updateHeatmapControls() {
    const available = !!heatmapOf(slide);
    $("heatmap-toggle").disabled = $("heatmap-opacity").disabled = !available;
    $("heatmap-toggle").parentElement.title = available ? ""
      : (run.strategies || []).length ? "No heatmap for this slide and strategy" : "This run has no heatmaps";
    $("legend").classList.toggle("disabled", !available);
    if (!available && state.heatmapOn) setHeatmap(false);
  }

  function setHeatmap(on) {
    const h = heatmapOf(slide);
    state.heatmapOn = on && !!h;
    state.heatmapReady = false;
    $("heatmap-toggle").checked = state.heatmapOn;
    const opacity = () => (state.heatmapOn ? Number($("heatmap-opacity").value) : 0);
    if (heatmap) { // already added (or being added): just show or hide it
      if (heatmap.item) heatmap.item.setOpacity(opacity());
      if (heatmap.item && state.heatmapOn) heatmap.check();
      return;
    }
    if (!state.heatmapOn || !slideItem) return;
    const layer = (heatmap = {});
    viewer.addTiledImage({
      tileSource: dziSource(h.dzi), x: 0, width: 1, opacity: opacity(),
      success: (e) => {
        if (layer !== heatmap) return viewer.world.removeItem(e.item); // slide or strategy changed meanwhile
        layer.item = e.item;
        e.item.setOpacity(opacity()); // the toggle may have changed while it was being added
        // Ready follows the current view: zooming to tiles not loaded yet makes it false until they are drawn.
        layer.check = whenDrawn(e.item, () => { if (layer === heatmap && state.heatmapOn) state.heatmapReady = true; },
          () => { if (layer === heatmap) state.heatmapReady = false; });
      },
      error: (e) => { if (layer === heatmap) { heatmap = null; showMessage(`Could not add the heatmap: ${e.message}`); } },
    });
  }

  function setStrategy(strategy) {
    state.strategy = strategy;
    if (heatmap && heatmap.item) viewer.world.removeItem(heatmap.item);
    const wasOn = state.heatmapOn;
    heatmap = null; // a layer still being added is dropped when it arrives
    updateHeatmapControls();
    setHeatmap(wasOn);
    renderList();
    renderInfo();
    renderGallery();
  }

  function setupToolbar() {
    const strategies = run.strategies || [];
    state.strategy = run.default_strategy ?? strategies[0] ?? null;
    const select = $("strategy-select");
    for (const s of strategies) select.append(el("option", { value: s, text: s }));
    if (state.strategy != null) select.value = state.strategy;
    $("strategy-tool").hidden = strategies.length < 2;
    select.addEventListener("change", () => setStrategy(select.value));
    $("heatmap-opacity").value = run.heatmap_opacity ?? 0.4;
    $("heatmap-toggle").addEventListener("change", (e) => setHeatmap(e.target.checked));
    $("heatmap-opacity").addEventListener("input", (e) => {
      if (state.heatmapOn && heatmap && heatmap.item) heatmap.item.setOpacity(Number(e.target.value));
    });
    $("tissue-toggle").addEventListener("change", () => loadOverlay("tissue"));
    $("grid-toggle").addEventListener("change", () => loadOverlay("tiles"));
    const cmap = run.colormap;
    if (cmap && cmap.stops && cmap.stops.length) {
      $("legend").hidden = false;
      $("legend-bar").style.background = `linear-gradient(to right, ${cmap.stops.join(", ")})`;
      $("legend-name").textContent = cmap.name || "";
      $("legend").title = `attention percentile 0 … 100 (${cmap.name || "colormap"})`;
    }
  }

  // ---------- tissue outline and tile grid: a canvas inside OSD's canvas box, under its buttons ----------
  const overlay = el("canvas", { id: "overlay" });
  viewer.canvas.appendChild(overlay);
  const EXCLUDED_COLOURS = { Ink: "#1f4fff", Bubble: "#00a5c8", Blur: "#a040d0", Fold: "#ff8c00" };

  async function loadOverlay(kind) {
    const s = slide, url = s && s[kind];
    const toggle = $(kind === "tissue" ? "tissue-toggle" : "grid-toggle");
    const what = kind === "tissue" ? "tissue outline" : "tile grid";
    if (toggle.checked && !url) {
      toggle.checked = false;
      showMessage(`No ${what} for this slide.`, "info");
    } else if (toggle.checked && !overlayData[kind]) {
      const { data, error } = await tryJSON(url);
      if (s !== slide) return;
      if (error) { toggle.checked = false; showMessage(`Could not load the ${what}: ${error}`); }
      else overlayData[kind] = kind === "tissue" ? tissueLayers(data) : data;
    }
    renderTissueLegend();
    drawOverlay();
  }

  // One Path2D per class in level-0 pixels, built once per slide; a redraw only changes the transform.
  function tissueLayers(geojson) {
    const layers = new Map();
    for (const f of geojson.features || []) {
      const g = f.geometry || {};
      const cls = (f.properties && f.properties.classification) || {};
      const name = cls.name || "Tissue";
      if (!layers.has(name)) {
        const rgb = Array.isArray(cls.color) ? `rgb(${cls.color.join(",")})` : null;
        const colour = name === "Tissue" ? "#1a9b3c" : rgb || EXCLUDED_COLOURS[name] || "#e0457b";
        layers.set(name, { name, colour, path: new Path2D(), excluded: name !== "Tissue" });
      }
      const path = layers.get(name).path;
      const polygons = g.type === "Polygon" ? [g.coordinates] : g.type === "MultiPolygon" ? g.coordinates : [];
      for (const ring of polygons.flat()) {
        ring.forEach(([x, y], i) => (i ? path.lineTo(x, y) : path.moveTo(x, y)));
        path.closePath();
      }
    }
    return [...layers.values()].sort((a, b) => a.excluded - b.excluded);
  }

  function renderTissueLegend() {
    const layers = ($("tissue-toggle").checked && overlayData.tissue) || [];
    $("tissue-legend").hidden = !layers.length;
    $("tissue-legend").replaceChildren(...layers.map((l) =>
      el("div", {}, el("span", { class: "swatch", style: `border-color:${l.colour}` }), l.name)));
  }

  function drawOverlay() {
    const dpr = window.devicePixelRatio || 1;
    const w = viewer.canvas.clientWidth, h = viewer.canvas.clientHeight;
    const [cw, ch] = [Math.round(w * dpr), Math.round(h * dpr)];
    if (overlay.width !== cw || overlay.height !== ch) Object.assign(overlay, { width: cw, height: ch }); // also clears
    const ctx = overlay.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, cw, ch);
    if (!slideItem) return;
    // Affine map level-0 pixels → element pixels from three reference points; lines are then drawn in
    // image coordinates with a width of n / scale screen pixels.
    const P = (x, y) => slideItem.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
    const o = P(0, 0), ex = P(1000, 0), ey = P(0, 1000);
    const [a, b, c, d] = [(ex.x - o.x) / 1000, (ex.y - o.y) / 1000, (ey.x - o.x) / 1000, (ey.y - o.y) / 1000];
    const scale = Math.hypot(a, b); // screen px per level-0 px
    ctx.setTransform(a * dpr, b * dpr, c * dpr, d * dpr, o.x * dpr, o.y * dpr);

    const tiles = $("grid-toggle").checked && overlayData.tiles;
    if (tiles && tiles.size * scale >= 4) { // below 4 px a grid is only noise
      const corners = [[0, 0], [w, 0], [0, h], [w, h]].map(([x, y]) =>
        slideItem.viewerElementToImageCoordinates(new OpenSeadragon.Point(x, y)));
      const xs = corners.map((p) => p.x), ys = corners.map((p) => p.y);
      const [x0, x1, y0, y1] = [Math.min(...xs) - tiles.size, Math.max(...xs), Math.min(...ys) - tiles.size, Math.max(...ys)];
      ctx.beginPath();
      for (const [x, y] of tiles.coords || []) {
        if (x >= x0 && x <= x1 && y >= y0 && y <= y1) ctx.rect(x, y, tiles.size, tiles.size);
      }
      Object.assign(ctx, { lineWidth: 1 / scale, strokeStyle: "rgba(20, 60, 160, 0.7)" }).stroke();
    }
    for (const layer of ($("tissue-toggle").checked && overlayData.tissue) || []) {
      Object.assign(ctx, { fillStyle: layer.colour, strokeStyle: layer.colour, lineWidth: (layer.excluded ? 2 : 1.5) / scale });
      if (layer.excluded) { // excluded regions lightly filled, so they read as "not used"
        ctx.globalAlpha = 0.15;
        ctx.fill(layer.path, "evenodd");
        ctx.globalAlpha = 1;
      }
      ctx.stroke(layer.path);
    }
    const f = overlayData.focus; // the gallery tile clicked last
    if (f) Object.assign(ctx, { lineWidth: 2 / scale, strokeStyle: "#ffd400" }).strokeRect(f.x, f.y, f.size, f.size);
  }
  viewer.addHandler("update-viewport", drawOverlay);
  viewer.addHandler("resize", drawOverlay);

  // ---------- side panel ----------
  function renderInfo() {
    const s = slide;
    if (!s) return;
    const p = predictionOf(s) || {};
    const rows = [];
    const add = (name, ...value) => rows.push(el("dt", { text: name }), el("dd", {}, ...value));
    const muted = (text) => el("span", { class: "muted", text });
    add("Slide", s.id);
    add("Case", s.case ?? "—");
    add("Label", s.label ?? muted("none"));
    if (p.prediction != null) {
      const seen = p.held_out === true ? "held out" : p.held_out === false ? "seen in training" : null;
      const extra = [p.fold != null ? `fold ${p.fold}` : null, seen].filter(Boolean).join(", ");
      add("Prediction", el("strong", { text: p.prediction }), " ",
        el("span", { class: correctClass(p.correct), text: mark(p.correct) }), extra ? muted(` (${extra})`) : null);
      const probs = p.probabilities || {};
      const classes = run.classes && run.classes.length ? run.classes : Object.keys(probs);
      add("Probabilities", el("div", { class: "probs" }, ...classes.map((c) => el("div", { class: "prob-row" },
        el("span", { text: c, title: c }),
        el("span", { class: "bar" }, el("span", { style: `width:${((probs[c] ?? 0) * 100).toFixed(1)}%` })),
        el("span", { class: "num", text: fmt(probs[c]) })))));
    } else {
      add("Prediction", muted("none"));
    }
    const mm = (px) => (s.mpp && px ? ((px * s.mpp) / 1000).toFixed(2) : "?");
    add("Resolution", s.mpp ? `${s.mpp} µm/px` : "unknown", s.mpp_source ? muted(` (${s.mpp_source})`) : null);
    if (s.width && s.height) add("Size", `${s.width} × ${s.height} px`, el("br"), `${mm(s.width)} × ${mm(s.height)} mm`);
    else add("Size", muted("unknown"));
    add("Reader", [s.backend, s.format].filter(Boolean).join(" · ") || "—");
    add("Tiles", String(s.n_tiles ?? "—"));
    add("QC", el("span", { class: s.status === "ok" ? "status-ok" : "status-bad", text: s.status || "unknown" }));
    const warnings = s.warnings || [];
    $("slide-details").replaceChildren(el("h2", { text: s.id }), el("dl", {}, ...rows));
    if (warnings.length) {
      $("slide-details").append(el("div", { class: "warning", role: "alert" }, el("strong", { text: "QC warnings" }),
        el("ul", {}, ...warnings.map((w) => el("li", { text: w })))));
    }
  }

  async function renderGallery() {
    const seq = ++gallerySeq;
    const top = $("gallery-top"), bottom = $("gallery-bottom"), note = $("gallery-note");
    const say = (text, empty = true) => {
      note.hidden = !text;
      note.textContent = text || "";
      $("gallery").classList.toggle("empty", empty); // hides the headings when there is nothing under them
    };
    top.replaceChildren();
    bottom.replaceChildren();
    const h = heatmapOf(slide);
    if (!h || !h.attention) {
      return say((run.strategies || []).length ? "No attention heatmap for this slide." : "This run has no attention heatmaps.");
    }
    say("Loading…");
    const { data, error } = await tryJSON(h.attention);
    if (seq !== gallerySeq) return;
    if (error) return say(`Could not load the attention tiles: ${error}`);
    const thumb = (t) => el("figure", { class: "thumb" },
      el("img", { src: t.image, alt: `rank ${t.rank}`, loading: "lazy", "data-x": t.x, "data-y": t.y, "data-size": t.size,
        title: `rank ${t.rank} · score ${fmt(t.score)} · percentile ${fmt(t.percentile, 1)} · (${t.x}, ${t.y})` }),
      el("figcaption", { text: `#${t.rank} · p${fmt(t.percentile, 1)}` }));
    top.replaceChildren(...(data.top || []).map(thumb));
    bottom.replaceChildren(...(data.bottom || []).map(thumb));
    const any = top.children.length + bottom.children.length > 0;
    say(any ? null : "No attention tiles for this slide.", !any);
  }

  // A click on a thumbnail pans and zooms to its tile, with half a tile of margin for context.
  function onThumbClick(e) {
    const fig = e.target.closest(".thumb");
    const img = fig && fig.querySelector("img");
    if (!img || !slideItem) return;
    const [x, y, size] = ["x", "y", "size"].map((k) => Number(img.dataset[k]));
    overlayData.focus = { x, y, size };
    viewer.viewport.fitBounds(slideItem.imageToViewportRectangle(x - size / 2, y - size / 2, size * 2, size * 2));
  }
  $("gallery-top").addEventListener("click", onThumbClick);
  $("gallery-bottom").addEventListener("click", onThumbClick);

  // ---------- start ----------
  async function init() {
    const { data, error } = await tryJSON("api/slides.json");
    if (error) {
      const text = `Could not load the slide list (${error}).`;
      showMessage(text);
      $("slide-list").replaceChildren(el("p", { class: "error-text", text }));
      return viewerMessage(text);
    }
    run = data.run || {};
    slides = Array.isArray(data.slides) ? data.slides : [];
    for (const s of slides) byId.set(s.id, s);
    $("run-info").textContent = [run.name, run.kind, (run.classes || []).join(" / "), `${slides.length} slides`]
      .filter(Boolean).join(" · ");
    setupToolbar();
    setupListControls();
    renderList();
    const wanted = slideFromHash();
    const first = byId.has(wanted) ? wanted : (visibleSlides()[0] || {}).id;
    if (!first) return viewerMessage("This run has no slides.");
    if (first !== wanted) history.replaceState(null, "", "#slide=" + encodeURIComponent(first));
    openSlide(first);
    if (wanted && wanted !== first) showMessage(`Slide "${wanted}" is not in this run; showing ${first}.`);
  }
  init();
})();
