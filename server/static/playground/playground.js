// vace-local playground: submits through the WaveSpeed dialect (upload endpoint + submit), polls the
// vace-local progress extension, plays the result and the previews. Plain JS, no dependencies.
"use strict";

const MODEL_PATH = "/api/v3/wavespeed-ai/wan-2.1-14b-vace";
const KEY_STORE = "vace.playground.apiKey";
const HISTORY_STORE = "vace.playground.history";
const HISTORY_MAX = 20;
const MAX_REFS = 5;
const SLOTS = ["video", "mask_video", "mask_image", "first_image", "last_image", "extend"];
const NUMBERS = ["duration", "num_inference_steps", "guidance_scale", "flow_shift", "context_scale", "seed"];
const POLL_MS = 400;

const $ = (sel) => document.querySelector(sel);
const form = $("#gen");

// Each media item: {name, file?, url?, thumb?}; `url` is set once uploaded (or loaded from history).
const media = { images: [], video: null, mask_video: null, mask_image: null, first_image: null, last_image: null,
  extend: null };
let current = null; // {id} of the job being watched (what Cancel cancels)
const blobUrls = [];

class Problem extends Error {
  constructor(message, field = null, status = 0) { super(message); this.field = field; this.status = status; }
}

// ---- API key and requests ---------------------------------------------------------------------------

function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }

function askKey(reason) {
  const dlg = $("#key-dialog");
  $("#key-reason").textContent = reason || "This server needs an API key. It is kept in this browser's storage.";
  $("#key-input").value = apiKey();
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => {
      const v = $("#key-input").value.trim();
      if (dlg.returnValue === "save" && v) { localStorage.setItem(KEY_STORE, v); resolve(true); return; }
      if (dlg.returnValue === "forget") localStorage.removeItem(KEY_STORE);
      resolve(false);
    }, { once: true });
    dlg.returnValue = "";
    dlg.showModal();
    $("#key-input").focus();
  });
}

async function api(path, opts = {}, retried = false) {
  const headers = new Headers(opts.headers || {});
  if (apiKey()) headers.set("Authorization", `Bearer ${apiKey()}`);
  const res = await fetch(path, { ...opts, headers });
  if (res.status === 401 && !retried) {
    const msg = await problemOf(res);
    const why = apiKey() ? `The saved API key was refused (${msg.message}). Enter a valid key.`
      : "This server needs an API key. It is kept in this browser's storage.";
    if (await askKey(why)) return api(path, opts, true);
    throw new Problem("an API key is needed: use the “API key…” button", null, 401);
  }
  return res;
}

const FIELD_PREFIX = /^([A-Za-z_][\w]*(?:\[\d+\])?(?:\.[\w]+)*):\s/;

// Any dialect's error body → {message, field}: the WaveSpeed envelope names the field at the start of
// `message`; other shapes (`field`, `error.field`, `error.param`, `detail`) are read too.
async function problemOf(res) {
  let body = null; let text = "";
  try { text = await res.text(); body = JSON.parse(text); } catch { /* not JSON */ }
  const err = body && typeof body.error === "object" && body.error ? body.error : {};
  let message = (body && (body.message || err.message || (typeof body.detail === "string" && body.detail)
    || (typeof body.error === "string" && body.error))) || text || res.statusText;
  if (Array.isArray(body && body.detail)) message = body.detail.map((d) => d.msg).join("; ");
  let field = (body && (body.field || err.field || err.param)) || null;
  const m = FIELD_PREFIX.exec(message);
  if (!field && m) field = m[1];
  return new Problem(`${message}`, field, res.status);
}

async function json(res) {
  if (!res.ok) throw await problemOf(res);
  const body = await res.json();
  return body.data !== undefined ? body.data : body;
}

// ---- form state ------------------------------------------------------------------------------------

function baseField(field) { return String(field || "").replace(/\[.*$/, "").replace(/\..*$/, ""); }

function clearErrors() {
  const box = $("#form-error");
  box.hidden = true; box.textContent = "";
  document.querySelectorAll("[aria-invalid=true]").forEach((el) => el.removeAttribute("aria-invalid"));
}

function fieldElement(field) {
  const name = baseField(field);
  if (name === "images" || name === "image") return $("#refs-field");
  if (SLOTS.includes(name)) return document.querySelector(`[data-field="${name}"]`);
  return form.elements[name] || null;
}

function showError(err) {
  const box = $("#form-error");
  box.textContent = "";
  const status = err.status ? `Error ${err.status}` : "Error";
  if (err.field) {
    box.append(`${status} in field `);
    const strong = document.createElement("strong");
    strong.className = "field-name"; strong.textContent = err.field;
    box.append(strong, `: ${err.message.replace(FIELD_PREFIX, "")}`);
  } else {
    box.append(`${status}: ${err.message}`);
  }
  box.hidden = false;
  const el = fieldElement(err.field);
  if (el) {
    el.setAttribute("aria-invalid", "true");
    if (el.closest("details")) el.closest("details").open = true;
    const focusable = el.matches("input,select,textarea") ? el : el.querySelector("input,button");
    if (focusable) focusable.focus();
  }
}

function renderSlot(name) {
  const item = media[name];
  const value = document.querySelector(`[data-value="${name}"]`);
  value.textContent = item ? item.name + (item.file ? "" : " (uploaded)") : "none";
  document.querySelector(`[data-clear="${name}"]`).hidden = !item;
  if (!item) document.getElementById(`${name}-input`).value = "";
}

function renderRefs() {
  const list = $("#refs");
  list.textContent = "";
  media.images.forEach((item, i) => {
    const li = document.createElement("li");
    li.draggable = true; li.dataset.index = String(i);
    if (item.thumb) { const img = document.createElement("img"); img.src = item.thumb; img.alt = ""; li.append(img); }
    const name = document.createElement("span");
    name.className = "name"; name.textContent = item.name + (item.file ? "" : " (uploaded)");
    li.append(name);
    const mk = (label, aria, fn, disabled) => {
      const b = document.createElement("button");
      b.type = "button"; b.className = "secondary"; b.textContent = label;
      b.setAttribute("aria-label", `${aria} ${item.name} (image ${i + 1})`); b.disabled = disabled;
      b.addEventListener("click", fn); li.append(b);
    };
    mk("↑", "Move up", () => moveRef(i, i - 1), i === 0);
    mk("↓", "Move down", () => moveRef(i, i + 1), i === media.images.length - 1);
    mk("✕", "Remove", () => { media.images.splice(i, 1); renderRefs(); }, false);
    li.addEventListener("dragstart", (e) => { e.dataTransfer.setData("text/x-ref", String(i)); li.classList.add("dragging"); });
    li.addEventListener("dragend", () => li.classList.remove("dragging"));
    li.addEventListener("dragover", (e) => { if (e.dataTransfer.types.includes("text/x-ref")) e.preventDefault(); });
    li.addEventListener("drop", (e) => {
      const from = e.dataTransfer.getData("text/x-ref");
      if (from === "") return;
      e.preventDefault(); e.stopPropagation(); moveRef(Number(from), i);
    });
    list.append(li);
  });
}

function moveRef(from, to) {
  if (to < 0 || to >= media.images.length) return;
  const [item] = media.images.splice(from, 1);
  media.images.splice(to, 0, item);
  renderRefs();
  const [up, down] = $("#refs").children[to].querySelectorAll("button"); // keep the keyboard where it was
  const same = from > to ? up : down;
  (same.disabled ? (from > to ? down : up) : same).focus();
}

function addRefs(files) {
  for (const file of files) {
    if (media.images.length >= MAX_REFS) {
      showError(new Problem(`at most ${MAX_REFS} reference images; “${file.name}” was not added`, "images")); break;
    }
    media.images.push({ name: file.name, file, thumb: URL.createObjectURL(file) });
  }
  renderRefs();
}

function setSlot(name, file) {
  media[name] = file ? { name: file.name, file } : null;
  renderSlot(name);
  if (painter.source === name) resetPainter(); // it was painted over the file just replaced
}

function wireInputs() {
  $("#images-input").addEventListener("change", (e) => { addRefs(e.target.files); e.target.value = ""; });
  for (const name of SLOTS) {
    document.getElementById(`${name}-input`).addEventListener("change", (e) => setSlot(name, e.target.files[0]));
    document.querySelector(`[data-clear="${name}"]`).addEventListener("click", () => setSlot(name, null));
  }
  document.querySelectorAll("[data-drop]").forEach((zone) => {
    const name = zone.dataset.drop;
    zone.addEventListener("dragover", (e) => {
      if (!e.dataTransfer.types.includes("Files")) return;
      e.preventDefault(); zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      if (!e.dataTransfer.files.length) return;
      e.preventDefault(); zone.classList.remove("over");
      if (name === "images") addRefs(e.dataTransfer.files); else setSlot(name, e.dataTransfer.files[0]);
    });
  });
}

// ---- mask painter ------------------------------------------------------------------------------------
// The mask lives in an offscreen canvas at the frame's own size (opaque white = painted, i.e. generate); the
// visible canvas shows the frame with the mask tinted over it. The frame is decoded here, in the browser (a
// <video> element for the first frame of a video, createImageBitmap for an image): the server never decodes
// media for the page. Over a video the mask is sent as `mask_image` (tracked through the clip by the worker);
// over the first frame image (a still) the painted pixels are made transparent, which the default
// `transparency_mode` (content_aware) reads as "generate here, mask 1".

const painter = { source: null, frame: null, mask: null, tint: null, tool: "brush", last: null, drawing: false,
  painted: false, name: "" };
const FRAME_TIMEOUT_MS = 20000;

function paintInfo(text) { $("#paint-info").textContent = text; }

async function blobOf(item) {
  if (item.file) return item.file;
  const u = new URL(item.url, location.href);
  const res = await api(u.origin === location.origin ? u.href : u.pathname + u.search);
  if (!res.ok) throw await problemOf(res);
  return res.blob();
}

function canvasOf(w, h) { const c = document.createElement("canvas"); c.width = w; c.height = h; return c; }

function firstVideoFrame(blob) {
  return new Promise((resolve, reject) => {
    const v = document.createElement("video");
    const url = URL.createObjectURL(blob);
    let timer = 0;
    const done = (fn, x) => { clearTimeout(timer); URL.revokeObjectURL(url); v.removeAttribute("src"); v.load(); fn(x); };
    const fail = () => done(reject, new Problem("this browser cannot decode the video's first frame", "video"));
    timer = setTimeout(fail, FRAME_TIMEOUT_MS);
    v.muted = true; v.playsInline = true; v.preload = "auto";
    v.addEventListener("error", fail, { once: true });
    v.addEventListener("loadeddata", () => { // readyState >= 2: the frame at time 0 is decoded
      if (!v.videoWidth) { fail(); return; }
      const c = canvasOf(v.videoWidth, v.videoHeight);
      c.getContext("2d").drawImage(v, 0, 0);
      done(resolve, c);
    }, { once: true });
    v.src = url;
  });
}

async function imageFrame(blob) {
  const bmp = await createImageBitmap(blob);
  const c = canvasOf(bmp.width, bmp.height);
  c.getContext("2d").drawImage(bmp, 0, 0);
  bmp.close();
  return c;
}

function resetPainter(text) {
  Object.assign(painter, { source: null, frame: null, mask: null, tint: null, last: null, drawing: false,
    painted: false });
  $("#paint-canvas").hidden = true;
  $("#paint-use").checked = false; $("#paint-use").disabled = true;
  paintInfo(text || "Choose a video (or a first frame image), then “Load frame”.");
}

async function loadPaintFrame() {
  const source = $("#paint-source").value;
  const item = media[source];
  if (!item) { paintInfo(source === "video" ? "Choose a video first." : "Choose a first frame image first."); return; }
  paintInfo("Decoding the first frame…");
  try {
    const blob = await blobOf(item);
    const frame = source === "video" ? await firstVideoFrame(blob) : await imageFrame(blob);
    Object.assign(painter, { source, frame, name: item.name, painted: false, last: null,
      mask: canvasOf(frame.width, frame.height), tint: canvasOf(frame.width, frame.height) });
  } catch (err) {
    resetPainter(`Could not load the frame: ${err.message}`);
    return;
  }
  const c = $("#paint-canvas");
  c.width = painter.frame.width; c.height = painter.frame.height; c.hidden = false;
  $("#paint-use").disabled = false; $("#paint-use").checked = true;
  redrawPaint();
  paintInfo(`${painter.name}: ${c.width}×${c.height}. Drag to paint where the model should generate.`);
}

function redrawPaint() {
  if (!painter.frame) return;
  const t = painter.tint.getContext("2d");
  t.globalCompositeOperation = "copy"; t.drawImage(painter.mask, 0, 0);
  t.globalCompositeOperation = "source-in"; t.fillStyle = "#ff2a55"; t.fillRect(0, 0, painter.tint.width, painter.tint.height);
  const g = $("#paint-canvas").getContext("2d");
  g.globalAlpha = 1; g.drawImage(painter.frame, 0, 0);
  g.globalAlpha = 0.6; g.drawImage(painter.tint, 0, 0); g.globalAlpha = 1;
}

function brushSize() { return Number($("#brush-size").value) || 32; }

function strokeTo(x, y) {
  const g = painter.mask.getContext("2d");
  g.globalCompositeOperation = painter.tool === "eraser" ? "destination-out" : "source-over";
  g.strokeStyle = "#fff"; g.fillStyle = "#fff"; g.lineCap = "round"; g.lineJoin = "round";
  g.lineWidth = brushSize();
  if (painter.last) {
    g.beginPath(); g.moveTo(painter.last[0], painter.last[1]); g.lineTo(x, y); g.stroke();
  } else { // a press without a move paints a dot
    g.beginPath(); g.arc(x, y, brushSize() / 2, 0, 2 * Math.PI); g.fill();
  }
  painter.last = [x, y];
  painter.painted = true;
  redrawPaint();
}

function framePoint(e) {
  const c = $("#paint-canvas");
  const r = c.getBoundingClientRect();
  return [(e.clientX - r.left) * c.width / r.width, (e.clientY - r.top) * c.height / r.height];
}

function invertMask() {
  if (!painter.mask) return;
  const g = painter.mask.getContext("2d");
  const img = g.getImageData(0, 0, painter.mask.width, painter.mask.height);
  const d = img.data;
  for (let i = 0; i < d.length; i += 4) { d[i] = 255; d[i + 1] = 255; d[i + 2] = 255; d[i + 3] = 255 - d[i + 3]; }
  g.putImageData(img, 0, 0);
  painter.painted = true;
  redrawPaint();
}

function clearMask() {
  if (!painter.mask) return;
  painter.mask.getContext("2d").clearRect(0, 0, painter.mask.width, painter.mask.height);
  redrawPaint();
}

function setTool(tool) {
  painter.tool = tool;
  for (const [id, t] of [["#tool-brush", "brush"], ["#tool-eraser", "eraser"]]) {
    $(id).setAttribute("aria-pressed", String(t === tool));
    $(id).classList.toggle("secondary", t !== tool);
  }
}

const pngOf = (canvas) => new Promise((resolve) => canvas.toBlob(resolve, "image/png"));

// The painted mask as the server reads one: white (generate) on black (keep), the frame's size.
async function paintedMaskPng() {
  const c = canvasOf(painter.mask.width, painter.mask.height);
  const g = c.getContext("2d");
  g.fillStyle = "#000"; g.fillRect(0, 0, c.width, c.height); g.drawImage(painter.mask, 0, 0);
  return pngOf(c);
}

// The still with its painted pixels transparent (content_aware: transparent = generate).
async function paintedStillPng() {
  const c = canvasOf(painter.frame.width, painter.frame.height);
  const g = c.getContext("2d");
  g.drawImage(painter.frame, 0, 0);
  g.globalCompositeOperation = "destination-out"; g.drawImage(painter.mask, 0, 0);
  return pngOf(c);
}

let paintedForNext = null; // the painted mask of the request being submitted, shown once its run starts

function showPainted(blob) {
  const url = URL.createObjectURL(blob);
  blobUrls.push(url);
  $("#painted-mask").src = url;
  $("#painted-figure").hidden = false;
}

// Adds the painted mask to a request body (uploaded like any other file, named for the field it fills).
async function addPaintedMask(body) {
  if (!painter.frame || !painter.painted || !$("#paint-use").checked) return null;
  const mask = await paintedMaskPng();
  const field = painter.source === "video" ? "mask_image" : "first_image";
  const blob = painter.source === "video" ? mask : await paintedStillPng();
  const stem = painter.name.replace(/\.[^.]*$/, "");
  const item = { name: `${stem}-${painter.source === "video" ? "mask" : "masked"}.png`,
    file: new File([blob], `${stem}-${painter.source === "video" ? "mask" : "masked"}.png`, { type: "image/png" }) };
  try { body[field] = await upload(item); } catch (e) { throw retag(e, field); }
  return mask;
}

function wirePainter() {
  const c = $("#paint-canvas");
  c.addEventListener("pointerdown", (e) => {
    if (!painter.frame || e.button !== 0) return;
    e.preventDefault(); c.setPointerCapture(e.pointerId);
    painter.drawing = true; painter.last = null; strokeTo(...framePoint(e));
  });
  c.addEventListener("pointermove", (e) => { if (painter.drawing) strokeTo(...framePoint(e)); });
  for (const ev of ["pointerup", "pointercancel"]) {
    c.addEventListener(ev, () => { painter.drawing = false; painter.last = null; });
  }
  $("#paint-load").addEventListener("click", () => loadPaintFrame());
  $("#paint-source").addEventListener("change", () => resetPainter());
  $("#tool-brush").addEventListener("click", () => setTool("brush"));
  $("#tool-eraser").addEventListener("click", () => setTool("eraser"));
  $("#paint-invert").addEventListener("click", invertMask);
  $("#paint-clear").addEventListener("click", clearMask);
  $("#brush-size").addEventListener("input", () => { $("#brush-size-value").textContent = $("#brush-size").value; });
}

// ---- building the request ----------------------------------------------------------------------------

async function upload(item) {
  if (item.url) return item.url;
  const fd = new FormData();
  fd.append("file", item.file, item.name);
  const data = await json(await api("/api/v3/media/upload/binary", { method: "POST", body: fd }));
  item.url = data.download_url;
  return item.url;
}

function readParams() {
  const body = {};
  for (const name of ["prompt", "negative_prompt", "task", "size"]) body[name] = form.elements[name].value;
  for (const name of NUMBERS) {
    const raw = form.elements[name].value.trim();
    if (raw === "") continue;
    const n = Number(raw);
    body[name] = Number.isFinite(n) ? n : raw; // a bad value is still sent: the server names field and rule
  }
  body.enable_fast_mode = form.elements.enable_fast_mode.checked;
  body.save_previews = form.elements.save_previews.checked;
  // Past the hosted 10 s the job is a long video: a vace-local extension the request opts into.
  if (typeof body.duration === "number" && body.duration > 10) body.long_video = true;
  return body;
}

async function buildBody(setStatus) {
  const body = readParams();
  const pending = [...media.images, ...SLOTS.map((s) => media[s])].filter((x) => x && !x.url);
  if (pending.length) setStatus(`Uploading ${pending.length} file(s)…`);
  // Uploads report the field they belong to, so a refused file names it.
  const images = [];
  for (const [i, item] of media.images.entries()) {
    try { images.push(await upload(item)); } catch (e) { throw retag(e, `images[${i}]`); }
  }
  body.images = images;
  for (const name of SLOTS) {
    if (!media[name]) continue;
    try { body[name] = await upload(media[name]); } catch (e) { throw retag(e, name); }
  }
  paintedForNext = await addPaintedMask(body);
  return body;
}

function retag(err, field) {
  if (err instanceof Problem && err.status !== 401 && (!err.field || err.field === "file")) {
    err.message = `${err.message.replace(FIELD_PREFIX, "")} (upload of this file)`; err.field = field;
  }
  return err;
}

// ---- running a job -------------------------------------------------------------------------------

function setStatus(text) { $("#status").textContent = text; }

function resetRun() {
  for (const u of blobUrls.splice(0)) URL.revokeObjectURL(u);
  for (const id of ["#result", "#preview-control", "#preview-mask"]) { const v = $(id); v.removeAttribute("src"); v.load(); }
  $("#logs").textContent = ""; $("#progress").value = 0; $("#result-links").textContent = "";
}

async function submit(body) {
  clearErrors();
  const data = await json(await api(MODEL_PATH, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) }));
  remember({ id: data.id, created: Date.now(), body, status: data.status });
  await watch(data.id);
}

function describe(p) {
  const step = p.total ? ` — step ${p.step}/${p.total}` : "";
  if (p.status === "created") {
    return p.queue_position === null || p.queue_position === undefined ? "Queued"
      : `Queued — position ${p.queue_position + 1} (${p.queue_position ? `${p.queue_position} job(s) ahead`
        : "next to run"})`;
  }
  if (p.status === "processing") return `Running — stage ${p.stage || "starting"}${step}`;
  if (p.status === "completed") return `Completed — stage ${p.stage}${step}`;
  return `Failed: ${p.error || "unknown error"}`;
}

function appendLogs(lines) {
  const list = $("#logs");
  for (const l of lines) {
    const li = document.createElement("li");
    if (l.level === "error") li.className = "error";
    li.textContent = `${(l.time || "").slice(11, 23)} [${l.source}] ${l.message}`;
    list.append(li);
  }
  list.scrollTop = list.scrollHeight;
}

async function playInto(video, url) {
  // Fetched with the key (a <video src> cannot send an Authorization header), then played from a blob.
  const u = new URL(url, location.href); // same-origin path: VACE_PUBLIC_BASE_URL may name another host
  const res = await api(u.origin === location.origin ? u.href : u.pathname + u.search);
  if (!res.ok) throw await problemOf(res);
  const blobUrl = URL.createObjectURL(await res.blob());
  blobUrls.push(blobUrl);
  video.src = blobUrl;
  video.play().catch(() => { /* autoplay may be refused; the controls still work */ });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let runSeq = 0; // each watch() gets a number; an older one stops touching the page once a newer starts

async function watch(id) {
  const seq = ++runSeq;
  const live = () => seq === runSeq;
  resetRun();
  $("#painted-figure").hidden = true;
  $("#live-figure").hidden = true; livePreviewUrl = null;
  if (paintedForNext) { showPainted(paintedForNext); paintedForNext = null; }
  current = { id };
  $("#cancel").disabled = false;
  $("#run-title").textContent = `Run ${id}`;
  let p = null; let next = 0; let failures = 0;
  try {
    while (live()) {
      try {
        p = await json(await api(`/api/v3/predictions/${encodeURIComponent(id)}/progress?since=${next}`));
        failures = 0;
      } catch (err) {
        // a restarting server (jobs survive restarts) or a 5xx is waited out; a 4xx is final
        if (!(err instanceof TypeError || err.status >= 500) || ++failures > 30) throw err;
        if (live()) setStatus(`Server unreachable (${err.message}); retrying…`);
        await sleep(1000);
        continue;
      }
      if (!live()) return;
      next = p.next;
      showLivePreview(p.preview, live);
      appendLogs(p.logs);
      setStatus(describe(p));
      $("#progress").value = p.progress;
      if (p.status === "completed" || p.status === "failed") break;
      await sleep(POLL_MS);
    }
  } finally {
    if (live()) { current = null; $("#cancel").disabled = true; }
  }
  if (!live() || !p) return;
  remember({ id, status: p.status, error: p.error });
  if (p.status !== "completed") return;
  const links = $("#result-links");
  const out = p.outputs[0];
  if (out) {
    await playInto($("#result"), out);
    const a = document.createElement("a"); a.href = out; a.textContent = "output URL"; links.append(a);
  }
  for (const kind of ["control", "mask"]) {
    if (live() && p.previews[kind]) await playInto($(`#preview-${kind}`), p.previews[kind]);
  }
  if (live() && !p.previews.control) links.append(" · no previews for this job (tick “Show the control video and mask”)");
}

// The worker's live preview of the denoised estimate: a new URL each time it changes (fetched with the key).
let livePreviewUrl = null;
let liveFetching = false;

function showLivePreview(preview, live) {
  if (!preview || preview.url === livePreviewUrl || liveFetching) return;
  liveFetching = true;
  (async () => {
    const u = new URL(preview.url, location.href);
    const res = await api(u.origin === location.origin ? u.href : u.pathname + u.search);
    if (!res.ok || !live()) return; // replaced meanwhile (the worker keeps the two newest): the next poll has it
    const blobUrl = URL.createObjectURL(await res.blob());
    blobUrls.push(blobUrl);
    livePreviewUrl = preview.url;
    $("#live-preview").src = blobUrl;
    $("#live-caption").textContent = `Live preview — step ${preview.step}/${preview.total}`;
    $("#live-figure").hidden = false;
  })().catch(() => { /* a missed preview is not an error: the next one comes with the next poll */ })
    .finally(() => { liveFetching = false; });
}

async function cancel() {
  if (!current) return;
  $("#cancel").disabled = true;
  try { await json(await api(`/api/v3/predictions/${encodeURIComponent(current.id)}/cancel`, { method: "POST" })); }
  catch (e) { showError(e); }
}

// ---- recent jobs (localStorage) ---------------------------------------------------------------------

function history() {
  try { return JSON.parse(localStorage.getItem(HISTORY_STORE) || "[]"); } catch { return []; }
}

function remember(entry) {
  const list = history();
  const i = list.findIndex((x) => x.id === entry.id);
  if (i >= 0) list[i] = { ...list[i], ...entry }; else if (entry.body) list.unshift(entry);
  localStorage.setItem(HISTORY_STORE, JSON.stringify(list.slice(0, HISTORY_MAX)));
  renderHistory();
}

function summary(b) {
  const refs = (b.images || []).length;
  const inputs = SLOTS.filter((s) => b[s]).join(", ");
  return [`task ${b.task}`, `size ${b.size}`, `${b.duration ?? 5} s`, `steps ${b.num_inference_steps ?? 30}`,
    `guidance ${b.guidance_scale ?? 5}`, `shift ${b.flow_shift ?? 16}`, `context ${b.context_scale ?? 1}`,
    `seed ${b.seed ?? -1}`, refs ? `${refs} reference(s)` : "", inputs].filter(Boolean).join(" · ");
}

function renderHistory() {
  const list = $("#history-list");
  list.textContent = "";
  for (const h of history()) {
    const li = document.createElement("li");
    li.dataset.id = h.id;
    const title = document.createElement("strong");
    title.textContent = `${(h.body.prompt || "").slice(0, 60)}`;
    const meta = document.createElement("div");
    meta.className = "params";
    meta.textContent = `${new Date(h.created).toLocaleString()} · ${h.id} · ${h.status}${h.error ? ` (${h.error})` : ""}`
      + ` · ${summary(h.body)}`;
    li.append(title);
    const mk = (label, fn) => {
      const b = document.createElement("button");
      b.type = "button"; b.className = "secondary"; b.textContent = label;
      b.setAttribute("aria-label", `${label} job ${h.id}`);
      b.addEventListener("click", fn); li.append(b);
    };
    mk("Show", () => watch(h.id).catch(showError));
    mk("Load", () => loadParams(h.body));
    mk("Re-run", () => { loadParams(h.body); submit(h.body).catch(onRunError); });
    li.append(meta);
    list.append(li);
  }
}

function nameOf(url) { return decodeURIComponent(String(url).split("/").pop() || url); }

function loadParams(b) {
  clearErrors();
  for (const name of ["prompt", "negative_prompt", "task", "size", ...NUMBERS]) {
    if (b[name] !== undefined) form.elements[name].value = String(b[name]);
  }
  form.elements.enable_fast_mode.checked = !!b.enable_fast_mode;
  form.elements.save_previews.checked = b.save_previews !== false;
  media.images = (b.images || []).map((url) => ({ name: nameOf(url), url }));
  for (const s of SLOTS) media[s] = b[s] ? { name: nameOf(b[s]), url: b[s] } : null;
  renderRefs(); SLOTS.forEach(renderSlot);
  form.elements.prompt.focus();
}

// ---- wiring -------------------------------------------------------------------------------------------

function onRunError(err) {
  if (!(err instanceof Problem)) err = new Problem(String(err && err.message ? err.message : err));
  showError(err);
  setStatus(`Not submitted: ${err.message}`);
}

async function onSubmit(e) {
  e.preventDefault();
  clearErrors();
  const btn = $("#submit");
  btn.disabled = true;
  try { await submit(await buildBody(setStatus)); } catch (err) { onRunError(err); } finally { btn.disabled = false; }
}

async function serverInfo() {
  try {
    const h = await (await fetch("/health")).json();
    $("#server-info").textContent = `model ${h.model}`;
    $("#tiny-banner").hidden = !h.tiny;
  } catch { $("#server-info").textContent = "server unreachable"; }
}

form.addEventListener("submit", onSubmit);
$("#cancel").addEventListener("click", cancel);
$("#key-button").addEventListener("click", () => askKey());
$("#history-clear").addEventListener("click", () => { localStorage.removeItem(HISTORY_STORE); renderHistory(); });
wireInputs();
wirePainter();
renderHistory();
serverInfo();
