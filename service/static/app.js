/* Captioner web page: upload -> POST /v1/captions -> caption words; hover/click a word to
   draw its attention grid (H x W, sums to 1) as a smooth heat map on a canvas over the image. */
(function () {
  "use strict";
  // Settings come as JSON data (the page's Content-Security-Policy runs no inline script).
  const cfgEl = document.getElementById("captioner-config");
  const cfg = cfgEl ? JSON.parse(cfgEl.textContent) : {endpoint: "/v1/captions", readyz: "/readyz", maxUploadBytes: 20 * 1048576};
  const $ = (id) => document.getElementById(id);
  const dropzone = $("dropzone"), fileInput = $("file-input"), photo = $("photo"), canvas = $("heatmap");
  const stage = $("stage"), dropHint = $("drop-hint"), busy = $("busy"), form = $("options");
  const captionEl = $("caption"), resultEl = $("result"), errorEl = $("error"), placeholder = $("placeholder");

  let currentFile = null, result = null, pinned = null, shown = null, objectUrl = null, requestSeq = 0;

  // ---------------------------------------------------------------- model status
  function pollStatus() {
    const el = $("model-status");
    fetch(cfg.readyz, {cache: "no-store"}).then((r) => r.json()).then((body) => {
      el.className = "status status-" + body.status;
      if (body.model) el.textContent = `${body.model.name} ${body.model.version}`;
      else el.textContent = body.status === "failed" ? "model failed to load" : "model loading…";
      if (body.status === "loading") setTimeout(pollStatus, 2000);
    }).catch(() => { el.className = "status status-failed"; el.textContent = "service unreachable"; });
  }

  // ---------------------------------------------------------------- choosing a file
  function choose() { fileInput.click(); }
  $("choose-button").addEventListener("click", (e) => { e.stopPropagation(); choose(); });
  $("replace-button").addEventListener("click", choose);
  dropzone.addEventListener("click", () => { if (!currentFile) choose(); });
  dropzone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); choose(); } });
  fileInput.addEventListener("change", () => { if (fileInput.files.length) useFile(fileInput.files[0]); fileInput.value = ""; });
  ["dragenter", "dragover"].forEach((t) => dropzone.addEventListener(t, (e) => { e.preventDefault(); dropzone.classList.add("dragover"); }));
  ["dragleave", "drop"].forEach((t) => dropzone.addEventListener(t, (e) => { e.preventDefault(); dropzone.classList.remove("dragover"); }));
  dropzone.addEventListener("drop", (e) => {
    const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (file) useFile(file);
  });
  form.addEventListener("submit", (e) => { e.preventDefault(); if (currentFile) send(); });
  form.addEventListener("change", () => { if (currentFile) send(); });

  function useFile(file) {
    if (file.size > cfg.maxUploadBytes) {
      showError("payload_too_large", `This file is ${(file.size / 1048576).toFixed(1)} MiB; the limit is ${(cfg.maxUploadBytes / 1048576).toFixed(0)} MiB.`);
      return;
    }
    currentFile = file; shown = null; pinned = null; result = null;
    resultEl.hidden = true; placeholder.hidden = false; errorEl.hidden = true;
    if (objectUrl) URL.revokeObjectURL(objectUrl);
    objectUrl = URL.createObjectURL(file);
    photo.src = objectUrl;
    stage.hidden = false; dropHint.hidden = true;
    dropzone.classList.add("has-image");
    $("replace-button").hidden = false;
    $("file-name").textContent = file.name;
    $("recaption").disabled = false;
    send();
  }

  // ---------------------------------------------------------------- the request
  function send() {
    const seq = ++requestSeq;
    const data = new FormData();
    data.append("image", currentFile, currentFile.name || "image");
    data.append("beam_size", $("beam-size").value);
    data.append("n_best", $("n-best").value);
    if ($("max-length").value) data.append("max_length", $("max-length").value);
    data.append("guidance", $("guidance").value);
    data.append("attention", "grid");
    busy.hidden = false; errorEl.hidden = true;
    const started = performance.now();
    fetch(cfg.endpoint, {method: "POST", body: data}).then((r) =>
      r.json().catch(() => ({error: {code: "http_" + r.status, message: r.statusText}})).then((body) => ({ok: r.ok, body}))
    ).then(({ok, body}) => {
      if (seq !== requestSeq) return;
      busy.hidden = true;
      if (!ok) {
        showError(body.error.code, body.error.message);
        if (!result) resetStage();  // a new file that failed: back to the drop zone
        return;
      }
      render(body, performance.now() - started);
    }).catch((err) => {
      if (seq !== requestSeq) return;
      busy.hidden = true;
      showError("network", String(err));
    });
  }

  function resetStage() {
    currentFile = null;
    stage.hidden = true; dropHint.hidden = false;
    dropzone.classList.remove("has-image");
    $("replace-button").hidden = true;
    $("recaption").disabled = true;
  }

  function showError(code, message) {
    errorEl.innerHTML = "";
    const c = document.createElement("code"); c.textContent = code;
    errorEl.append(c, document.createTextNode(" " + message));
    errorEl.hidden = false;
    if (!result) placeholder.hidden = false;
  }

  // ---------------------------------------------------------------- rendering the result
  function render(body, roundTripMs) {
    result = body; pinned = null; shown = null;
    placeholder.hidden = true; resultEl.hidden = false;
    captionEl.innerHTML = "";
    body.tokens.forEach((tok, i) => {
      const b = document.createElement("button");
      b.type = "button"; b.className = "word"; b.textContent = tok.word; b.dataset.index = String(i);
      const p = Math.exp(tok.logprob);
      b.style.setProperty("--conf", (0.15 + 0.85 * p).toFixed(3));
      b.title = `p = ${(p * 100).toFixed(1)}%`;
      b.addEventListener("mouseenter", () => show(i));
      b.addEventListener("focus", () => show(i));
      b.addEventListener("mouseleave", () => show(pinned));
      b.addEventListener("blur", () => show(pinned));
      b.addEventListener("click", () => { pinned = pinned === i ? null : i; show(pinned === null ? i : pinned); markPinned(); });
      captionEl.append(b, document.createTextNode(" "));
    });
    if (!body.tokens.length) captionEl.textContent = "(empty caption)";

    const concepts = $("concepts"); concepts.innerHTML = "";
    (body.concepts || []).forEach((c) => {
      const li = document.createElement("li");
      const s = document.createElement("span"); s.className = "score"; s.textContent = `${Math.round(c.probability * 100)}%`;
      li.append(document.createTextNode(c.word), s);
      concepts.append(li);
    });
    $("concepts-block").hidden = !(body.concepts || []).length;

    const alts = $("alternatives"); alts.innerHTML = "";
    body.alternatives.forEach((a) => {
      const li = document.createElement("li");
      const s = document.createElement("span"); s.className = "score"; s.textContent = a.score.toFixed(2);
      li.append(document.createTextNode(a.caption), s);
      alts.append(li);
    });
    $("alternatives-block").hidden = body.alternatives.length === 0;

    const t = body.timing_ms, timing = $("timing"); timing.innerHTML = "";
    const rows = [["queue", t.queue], ["preprocess", t.preprocess], ["inference", t.inference],
                  ["server total", t.total], ["round trip", roundTripMs], ["batch size", body.batch_size]];
    rows.forEach(([k, v]) => {
      const d = document.createElement("div"), dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = k; dd.textContent = k === "batch size" ? String(v) : `${v.toFixed(v < 10 ? 1 : 0)} ms`;
      d.append(dt, dd); timing.append(d);
    });
    $("meta").textContent = `${body.model.name} ${body.model.version} · image ${body.image.width}×${body.image.height} · ` +
      `attention grid ${body.grid[0]}×${body.grid[1]} · beam ${body.parameters.beam_size}`;
    $("word-detail").innerHTML = "&nbsp;";
    draw(null);
  }

  function markPinned() {
    captionEl.querySelectorAll(".word").forEach((w) => w.classList.toggle("active", Number(w.dataset.index) === pinned));
  }

  function show(index) {
    shown = index;
    captionEl.querySelectorAll(".word").forEach((w) => {
      const i = Number(w.dataset.index);
      w.classList.toggle("active", i === index || i === pinned);
    });
    const detail = $("word-detail");
    if (index === null || !result) { detail.innerHTML = "&nbsp;"; draw(null); return; }
    const tok = result.tokens[index];
    const grid = tok.attention, flat = grid.flat(), peak = Math.max(...flat);
    const at = flat.indexOf(peak), W = grid[0].length;
    detail.textContent = `“${tok.word}”: p = ${(Math.exp(tok.logprob) * 100).toFixed(1)}% · ` +
      `strongest attention ${(peak * 100).toFixed(1)}% at row ${Math.floor(at / W) + 1}, column ${(at % W) + 1}`;
    draw(grid);
  }

  // ---------------------------------------------------------------- the heat map
  const JET = [[0, [0, 0, 127]], [0.125, [0, 0, 255]], [0.375, [0, 255, 255]], [0.625, [255, 255, 0]], [0.875, [255, 0, 0]], [1, [127, 0, 0]]];
  function jet(v) {
    for (let k = 1; k < JET.length; k++) {
      if (v <= JET[k][0]) {
        const [x0, c0] = JET[k - 1], [x1, c1] = JET[k], f = (v - x0) / (x1 - x0);
        return c0.map((c, j) => Math.round(c + f * (c1[j] - c)));
      }
    }
    return JET[JET.length - 1][1];
  }

  // Fit the image into the drop zone (scaling small images up too), so the heat map is easy to read.
  function fitImage() {
    if (!photo.naturalWidth) return;
    const maxW = dropzone.clientWidth - 24, maxH = Math.max(240, Math.min(window.innerHeight * 0.72, 640));
    const scale = Math.min(maxW / photo.naturalWidth, maxH / photo.naturalHeight);
    photo.style.width = Math.floor(photo.naturalWidth * scale) + "px";
    photo.style.height = Math.floor(photo.naturalHeight * scale) + "px";
  }

  function sizeCanvas() {
    fitImage();
    const w = photo.clientWidth, h = photo.clientHeight, dpr = window.devicePixelRatio || 1;
    canvas.style.width = w + "px"; canvas.style.height = h + "px";
    canvas.width = Math.max(1, Math.round(w * dpr)); canvas.height = Math.max(1, Math.round(h * dpr));
  }

  function draw(grid) {
    sizeCanvas();
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    canvas.dataset.word = grid ? String(shown) : "";
    if (!grid) return;
    // Min-max scaled, like the paper's figures: the most attended cell is red, the least is clear.
    const flat = grid.flat(), lo = Math.min(...flat), hi = Math.max(...flat);
    const H = grid.length, W = grid[0].length, norm = (a) => (hi - lo > 1e-6 ? (a - lo) / (hi - lo) : 0.5);
    // One pixel per cell (plus a 1-cell border copy so edges do not fade), scaled up with smoothing.
    const off = document.createElement("canvas");
    off.width = W + 2; off.height = H + 2;
    const octx = off.getContext("2d"), img = octx.createImageData(W + 2, H + 2);
    for (let y = 0; y < H + 2; y++) {
      for (let x = 0; x < W + 2; x++) {
        const v = norm(grid[Math.min(H - 1, Math.max(0, y - 1))][Math.min(W - 1, Math.max(0, x - 1))]);
        const [r, g, b] = jet(v), o = 4 * (y * (W + 2) + x);
        img.data[o] = r; img.data[o + 1] = g; img.data[o + 2] = b; img.data[o + 3] = Math.round(255 * (0.12 + 0.58 * v));
      }
    }
    octx.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = true; ctx.imageSmoothingQuality = "high";
    // Source rect = the W x H cells (centres at half-pixels) so each cell covers its share of the image.
    ctx.drawImage(off, 1, 1, W, H, 0, 0, canvas.width, canvas.height);
  }

  photo.addEventListener("load", () => draw(shown !== null && result ? result.tokens[shown].attention : null));
  window.addEventListener("resize", () => { if (result && shown !== null) draw(result.tokens[shown].attention); else sizeCanvas(); });

  pollStatus();
})();
