// The page: upload an image, show its caption, the beams, and each word's attention.
// Heat maps are drawn here from the API's attention grids, so the JSON stays small.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { result: null, beam: 0, pinned: 0, shown: -1, heat: [] };
const STRENGTH = 0.6; // heat-map opacity where attention peaks
const MAX_PHOTO_HEIGHT = 480;

async function init() {
  const select = $("beam-size");
  let maxBeam = 5;
  try {
    const info = await (await fetch("/api/model")).json();
    maxBeam = info.limits.max_beam;
    const metric = info.monitor && info.metrics[info.monitor];
    const parts = [
      `encoder ${info.encoder.name}`,
      `decoder ${info.decoder.name}`,
      `${info.vocab_size} words`,
      metric != null ? `${info.monitor} ${Number(metric).toFixed(3)}` : null,
    ];
    $("model-info").textContent = parts.filter(Boolean).join(" · ");
    $("model-data").textContent = `Trained on ${info.trained_on}. ${scoresText(info.test_scores)}`;
    if (info.notice) {
      withCode($("model-notice"), info.notice);
      $("model-notice").hidden = false;
    }
  } catch (e) {
    $("model-info").textContent = "model information unavailable";
  }
  for (let k = 1; k <= maxBeam; k++) {
    select.add(new Option(String(k), String(k), k === 3, k === 3));
  }

  const drop = $("drop");
  const input = $("file");
  drop.addEventListener("click", (e) => { if (!e.target.closest(".beam")) input.click(); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  $("choose").addEventListener("click", (e) => { e.stopPropagation(); input.click(); });
  input.addEventListener("change", () => { if (input.files[0]) upload(input.files[0]); });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => {
    const file = e.dataTransfer.files[0];
    if (file) upload(file);
  });
  select.addEventListener("change", () => { if (input.files[0]) upload(input.files[0]); });
  window.addEventListener("resize", fitPhoto);
  document.body.dataset.ready = "1";
}

// "Test scores: BLEU-4 0.224 · CIDEr-D 0.560 (beam 5)", saying whose scores they are.
function scoresText(test) {
  if (!test) return "Test scores: not known (no test_metrics.json in the checkpoint's run).";
  const names = { "BLEU-4": "BLEU-4", CIDEr: "CIDEr-D", METEOR: "METEOR", "ROUGE-L": "ROUGE-L" };
  const shown = Object.entries(names)
    .filter(([k]) => test.metrics[k] != null)
    .map(([k, label]) => `${label} ${Number(test.metrics[k]).toFixed(3)}`);
  const d = test.decode || {};
  const how = d.beam_size > 1 ? `beam ${d.beam_size}` : d.beam_size === 1 ? "greedy" : "";
  const whose = test.this_checkpoint ? "" : ` Scores of this run's ${test.checkpoint || "final weights"}.`;
  return `Test scores: ${shown.join(" · ")}${how ? ` (${how})` : ""}.${whose}`;
}

// Text with `code` spans, built as DOM nodes (never HTML from the server).
function withCode(el, text) {
  el.replaceChildren();
  text.split("`").forEach((part, i) => {
    if (i % 2) {
      const code = document.createElement("code");
      code.textContent = part;
      el.append(code);
    } else {
      el.append(part);
    }
  });
}

function showWarnings(list) {
  const ul = $("warnings");
  ul.replaceChildren(...list.map((w) => {
    const li = document.createElement("li");
    li.textContent = w;
    return li;
  }));
  ul.hidden = list.length === 0;
}

function showError(msg) {
  $("error").textContent = msg;
  $("error").hidden = !msg;
}

async function upload(file) {
  showError("");
  showWarnings([]);
  $("busy").hidden = false;
  const form = new FormData();
  form.append("file", file, file.name);
  const beamSize = $("beam-size").value || "3";
  try {
    const resp = await fetch(`/api/caption?beam_size=${beamSize}`, { method: "POST", body: form });
    const body = await resp.json().catch(() => ({ detail: `HTTP ${resp.status}` }));
    if (!resp.ok) throw new Error(body.detail || `HTTP ${resp.status}`);
    const photo = $("photo");
    if (photo.src) URL.revokeObjectURL(photo.src);
    photo.src = URL.createObjectURL(file);
    try { await photo.decode(); } catch (e) { /* a format the browser cannot show, e.g. TIFF */ }
    render(body);
    showWarnings(body.warnings || []);
  } catch (e) {
    showError(`Could not caption ${file.name}: ${e.message}`);
  } finally {
    $("busy").hidden = true;
  }
}

// Show the photo as large as its column allows (small images too), keeping its aspect ratio.
function fitPhoto() {
  if (!state.result) return;
  const { width, height } = state.result.image;
  const room = $("stage").parentElement.clientWidth;
  const scale = Math.min(room / width, MAX_PHOTO_HEIGHT / height);
  $("photo").style.width = `${Math.max(1, Math.round(width * scale))}px`;
  $("photo").style.height = `${Math.max(1, Math.round(height * scale))}px`;
}

function render(result) {
  state.result = result;
  $("result").hidden = false;
  fitPhoto();
  const img = result.image;
  const [x0, y0, x1, y1] = img.crop;
  const whole = x0 <= 0.5 && y0 <= 0.5 && x1 >= img.width - 0.5 && y1 >= img.height - 0.5;
  $("outside-note").hidden = whole;
  const crop = $("crop");
  crop.style.left = `${(100 * x0) / img.width}%`;
  crop.style.top = `${(100 * y0) / img.height}%`;
  crop.style.width = `${(100 * (x1 - x0)) / img.width}%`;
  crop.style.height = `${(100 * (y1 - y0)) / img.height}%`;

  const beams = $("beams");
  beams.replaceChildren();
  result.beams.forEach((b, k) => {
    const li = document.createElement("li");
    const text = document.createElement("span");
    text.textContent = b.caption || "(empty caption)";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${b.score.toFixed(3)}`;
    score.title = `log-probability ${b.logprob.toFixed(3)}, per word ${b.score.toFixed(3)}`;
    li.append(text, score);
    li.addEventListener("click", () => selectBeam(k));
    beams.append(li);
  });
  const t = result.timings_ms;
  const ms = Object.values(t).reduce((a, b) => a + b, 0);
  const together = result.batch_size > 1
    ? ` · searched together with ${result.batch_size - 1} other image${result.batch_size > 2 ? "s" : ""}`
    : "";
  $("meta").textContent = `${img.width}×${img.height} ${img.format} · beam size ${result.beam_size}` +
    ` · ${ms.toFixed(0)} ms on the server (model ${t.model.toFixed(0)} ms)${together}`;
  selectBeam(0);
}

function selectBeam(k) {
  state.beam = k;
  const beam = state.result.beams[k];
  [...$("beams").children].forEach((li, i) => li.classList.toggle("selected", i === k));
  const g = state.result.grid;
  state.heat = beam.attention && g ? beam.attention.map((a) => heatCanvas(a, g, 224)) : [];

  const caption = $("caption");
  caption.replaceChildren();
  beam.words.forEach((w, i) => {
    const span = document.createElement("span");
    span.className = "word";
    span.textContent = w;
    span.dataset.index = String(i);
    span.addEventListener("mouseenter", () => show(i));
    span.addEventListener("mouseleave", () => show(state.pinned));
    span.addEventListener("click", () => { state.pinned = i; show(i); });
    caption.append(span, " ");
  });
  $("attn-help").hidden = state.heat.length === 0;
  $("no-attn").hidden = state.heat.length > 0;
  buildTiles(beam);
  state.pinned = 0;
  state.shown = -1;
  show(0);
}

function show(i) {
  const canvas = $("overlay");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const heat = state.heat[i];
  if (heat) ctx.drawImage(heat, 0, 0, canvas.width, canvas.height);
  canvas.dataset.word = heat ? String(i) : "";
  state.shown = i;
  document.querySelectorAll(".word").forEach((el, j) => el.classList.toggle("active", j === i));
  document.querySelectorAll(".tile").forEach((el, j) => el.classList.toggle("active", j === i));
}

function buildTiles(beam) {
  const tiles = $("tiles");
  tiles.replaceChildren();
  const wrap = tiles.parentElement;
  wrap.hidden = state.heat.length === 0;
  if (!state.heat.length) return;
  const photo = $("photo");
  const img = state.result.image;
  // The crop box is in the image's displayed pixels; the browser's natural size may differ
  // only if it could not decode the file, and then there is no photo to draw anyway.
  const sx = photo.naturalWidth / img.width || 0;
  const sy = photo.naturalHeight / img.height || 0;
  const [x0, y0, x1, y1] = img.crop;
  beam.words.forEach((w, i) => {
    const tile = document.createElement("div");
    tile.className = "tile";
    const c = document.createElement("canvas");
    c.width = c.height = 160;
    const ctx = c.getContext("2d");
    ctx.fillStyle = "#222";
    ctx.fillRect(0, 0, 160, 160);
    if (sx && sy) {
      ctx.drawImage(photo, x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy, 0, 0, 160, 160);
    }
    ctx.drawImage(state.heat[i], 0, 0, 160, 160);
    const label = document.createElement("div");
    label.textContent = w;
    tile.append(c, label);
    tile.addEventListener("mouseenter", () => show(i));
    tile.addEventListener("mouseleave", () => show(state.pinned));
    tile.addEventListener("click", () => { state.pinned = i; show(i); });
    tiles.append(tile);
  });
}

// One word's attention (grid x grid, any scale) -> a smooth, transparent heat map canvas.
// Smoothstep-weighted interpolation between cell centres: no blocky cells, no blur halo at edges.
function heatCanvas(att, g, size) {
  const flat = att.flat();
  const max = Math.max(...flat, 1e-8);
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(size, size);
  const coord = new Array(size);
  for (let p = 0; p < size; p++) {
    const u = Math.min(Math.max(((p + 0.5) * g) / size - 0.5, 0), g - 1);
    const i0 = Math.min(Math.floor(u), g - 2 < 0 ? 0 : g - 2);
    const f = u - i0;
    coord[p] = [i0, Math.min(i0 + 1, g - 1), f * f * (3 - 2 * f)];
  }
  for (let y = 0; y < size; y++) {
    const [r0, r1, fy] = coord[y];
    for (let x = 0; x < size; x++) {
      const [c0, c1, fx] = coord[x];
      const top = flat[r0 * g + c0] * (1 - fx) + flat[r0 * g + c1] * fx;
      const bot = flat[r1 * g + c0] * (1 - fx) + flat[r1 * g + c1] * fx;
      const a = (top * (1 - fy) + bot * fy) / max;
      const o = 4 * (y * size + x);
      // The black-red-yellow-white ramp of captioning.viz, so the page matches the CLI figures.
      img.data[o] = 255 * Math.min(Math.max(3 * a, 0), 1);
      img.data[o + 1] = 255 * Math.min(Math.max(3 * a - 1, 0), 1);
      img.data[o + 2] = 255 * Math.min(Math.max(3 * a - 2, 0), 1);
      img.data[o + 3] = 255 * STRENGTH * a;
    }
  }
  ctx.putImageData(img, 0, 0);
  return canvas;
}

init();
