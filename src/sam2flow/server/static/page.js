// sam2flow labelling page: one image embedded once, every prompt change one decode (POST /page/decode).
// Coordinates sent to the server are image pixels (x right, y down); masks come back as COCO RLE.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                "#469990", "#9a6324", "#800000", "#000075"];
const DRAG_PX = 5;  // a press that moves less than this is a click

const S = {
  config: null, key: sessionStorage.getItem("sam2flow-key") || "",
  image: null,     // {name, width, height, bitmap, imageId, folder: bool}
  objects: [],     // {id, label, color, box: [x1,y1,x2,y2]|null, points: [[x,y,label]], rle, score}
  current: null,   // id of the object clicks refine
  past: [], future: [],
  nextId: 1, folder: null, queue: Promise.resolve(), saving: Promise.resolve(), saveError: null,
  busy: false, lastDecode: null,
};
const maskCache = new Map();  // rle counts → canvas with the mask drawn in its object's colour

// ---------------------------------------------------------------- server calls and messages
class ServerError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body, raw = false) {
  const headers = {};
  if (S.key) headers["Authorization"] = "Bearer " + S.key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (e) {
    throw new ServerError(0, `Cannot reach the server at ${location.origin}: is sam2flow serve running?`);
  }
  if (resp.status === 401 && S.config && S.config.auth) {
    await askKey(S.key ? "The key was refused: try again." : "");
    if (!S.key) throw new ServerError(401, "This server needs an API key: none was given.");
    return api(method, path, body, raw);
  }
  if (!resp.ok) {
    let detail = "";
    try { detail = (await resp.json()).error || ""; } catch (e) { detail = resp.statusText; }
    throw new ServerError(resp.status, explain(resp.status, detail));
  }
  return raw ? resp.blob() : resp.json();
}

function explain(status, detail) {
  if (status === 401) return "Missing or wrong API key.";
  if (status === 413) return `Too large for this server: ${detail}`;
  if (status === 404) return `Not found: ${detail}`;
  if (status === 503) return `The model is not available: ${detail}`;
  if (status >= 500) return `Server error (${status}): ${detail}`;
  return `The server refused the request (${status}): ${detail}`;
}

function askKey(error) {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-error").textContent = error;
    $("key-input").value = "";
    dialog.onclose = () => {
      S.key = $("key-input").value.trim();
      sessionStorage.setItem("sam2flow-key", S.key);
      resolve();
    };
    if (!dialog.open) dialog.showModal();
  });
}

let progressTimer = null;
function status(text, kind = "info") {
  clearInterval(progressTimer);
  $("status").className = kind === "error" ? "error" : "";
  $("progress").hidden = kind !== "busy";
  if (kind === "busy") {
    const start = performance.now();
    const tick = () => { $("status-text").textContent = `${text} ${((performance.now() - start) / 1000).toFixed(1)} s`; };
    tick();
    progressTimer = setInterval(tick, 100);
  } else {
    $("status-text").textContent = text;
  }
}

// ---------------------------------------------------------------- COCO RLE (compressed counts) → mask
// The string form is pycocotools' rleToString: each count in 5-bit groups (+48), continuation bit 0x20,
// sign bit 0x10 on the last group, and from the third count on, the difference to the count two before.
function rleCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1, c = 0;
    while (more) {
      c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

function maskCanvas(rle, color, alpha) {
  const key = rle.counts + color + alpha;
  if (maskCache.has(key)) return maskCache.get(key);
  const [h, w] = rle.size;
  const canvas = document.createElement("canvas");
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(color.slice(i, i + 2), 16));
  let pos = 0, on = false;
  for (const n of rleCounts(rle.counts)) {  // column-major runs, starting with background
    if (on) {
      for (let i = pos; i < pos + n; i++) {
        const o = ((i % h) * w + Math.floor(i / h)) * 4;
        img.data[o] = r; img.data[o + 1] = g; img.data[o + 2] = b; img.data[o + 3] = alpha;
      }
    }
    pos += n; on = !on;
  }
  ctx.putImageData(img, 0, 0);
  if (maskCache.size > 500) maskCache.clear();
  maskCache.set(key, canvas);
  return canvas;
}

// ---------------------------------------------------------------- drawing
let view = {scale: 1};
function layout() {
  const stage = $("stage"), canvas = $("canvas");
  if (!S.image) { canvas.width = canvas.height = 0; return; }
  const scale = Math.min((stage.clientWidth - 16) / S.image.width, (stage.clientHeight - 16) / S.image.height);
  view.scale = scale;
  const dpr = window.devicePixelRatio || 1;
  canvas.style.width = `${S.image.width * scale}px`;
  canvas.style.height = `${S.image.height * scale}px`;
  canvas.width = Math.round(S.image.width * scale * dpr);
  canvas.height = Math.round(S.image.height * scale * dpr);
  draw();
}

function draw(dragBox) {
  const canvas = $("canvas"), ctx = canvas.getContext("2d");
  if (!S.image) return;
  const k = canvas.width / S.image.width;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.setTransform(k, 0, 0, k, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(S.image.bitmap, 0, 0);
  ctx.imageSmoothingEnabled = false;
  for (const o of S.objects) {
    if (o.rle) ctx.drawImage(maskCanvas(o.rle, o.color, o.id === S.current ? 150 : 95), 0, 0);
  }
  const cur = S.objects.find((o) => o.id === S.current);
  ctx.lineWidth = 2 / k;
  if (cur) {
    if (cur.box) { ctx.strokeStyle = cur.color; ctx.strokeRect(cur.box[0], cur.box[1], cur.box[2] - cur.box[0], cur.box[3] - cur.box[1]); }
    for (const [x, y, label] of cur.points) {
      ctx.beginPath(); ctx.arc(x, y, 5 / k, 0, 2 * Math.PI);
      ctx.fillStyle = label ? "#00c853" : "#d50000"; ctx.fill();
      ctx.strokeStyle = "#fff"; ctx.stroke();
    }
  }
  if (dragBox) {
    ctx.setLineDash([6 / k, 4 / k]); ctx.strokeStyle = "#fff";
    ctx.strokeRect(dragBox[0], dragBox[1], dragBox[2] - dragBox[0], dragBox[3] - dragBox[1]);
    ctx.setLineDash([]);
  }
}

function renderList() {
  const list = $("objects");
  list.textContent = "";
  for (const o of S.objects) {
    const li = document.createElement("li");
    li.className = o.id === S.current ? "current" : "";
    li.dataset.id = o.id;
    const sw = document.createElement("span");
    sw.className = "swatch"; sw.style.background = o.color;
    li.append(sw, `${o.label}` + (o.score == null ? "" : ` · ${o.score.toFixed(2)}`));
    li.onclick = () => select(o.id);
    list.append(li);
  }
  const cur = S.objects.find((o) => o.id === S.current);
  if (cur && document.activeElement !== $("label")) $("label").value = cur.label;
  $("undo").disabled = !S.past.length; $("redo").disabled = !S.future.length;
  $("delete-object").disabled = !cur;
}

function refresh() { renderList(); draw(); }

// ---------------------------------------------------------------- state, undo, redo
const snapshot = () => JSON.stringify({objects: S.objects, current: S.current});
function restore(snap) {
  const s = JSON.parse(snap);
  S.objects = s.objects; S.current = s.current;
}
function commit(before) {  // the state changed from `before`: remember it, save it
  S.past.push(before); S.future = [];
  if (S.past.length > 200) S.past.shift();
  refresh(); save();
}
function undo() {
  if (!S.past.length) return;
  S.future.push(snapshot()); restore(S.past.pop()); refresh(); save();
}
function redo() {
  if (!S.future.length) return;
  S.past.push(snapshot()); restore(S.future.pop()); refresh(); save();
}

function currentLabel() {
  const typed = $("label").value.trim();
  return typed || (S.config.labels[0] || "object");
}

function newObject(fields) {
  const id = S.nextId++;
  const o = {id, label: currentLabel(), color: COLORS[(id - 1) % COLORS.length], box: null, points: [],
             rle: null, score: null, ...fields};
  S.objects.push(o); S.current = id;
  return o;
}

function select(id) { S.current = id; refresh(); }

function relabel(label) {
  const cur = S.objects.find((o) => o.id === S.current);
  if (!cur || !label || cur.label === label) return;
  const before = snapshot();
  cur.label = label;
  commit(before);
}

function deleteCurrent() {
  const i = S.objects.findIndex((o) => o.id === S.current);
  if (i < 0) return;
  const before = snapshot();
  S.objects.splice(i, 1); S.current = null;
  commit(before);
}

// Prompt changes run one after another, each one decode; a failed decode leaves the state as it was.
function prompt(change) {
  if (!S.image || !S.image.imageId) { status("Open an image first (or wait for it to embed).", "error"); return S.queue; }
  S.queue = S.queue.then(async () => {
    const before = snapshot();
    const o = change();
    const started = performance.now();
    try {
      const answer = await api("POST", "/page/decode", {
        image_id: S.image.imageId, sam2_version_id: S.config.version, box: o.box, points: o.points,
        max_hole_area: Number($("max-hole").value) || 0, max_sprinkle_area: Number($("max-sprinkle").value) || 0,
      });
      o.rle = answer.rle; o.score = answer.score;
      S.lastDecode = {server_ms: answer.time * 1000, round_trip_ms: performance.now() - started, refined: answer.refined};
      status(`${o.label}: score ${answer.score.toFixed(3)} · decoded in ${S.lastDecode.round_trip_ms.toFixed(0)} ms`);
      commit(before);
    } catch (e) {
      restore(before); refresh();
      status(e.message, "error");
    }
  });
  return S.queue;
}

function addPoint(x, y, label) {
  return prompt(() => {
    let o = S.objects.find((q) => q.id === S.current);
    if (!o) o = newObject({});
    o.points = [...o.points, [x, y, label]];
    return o;
  });
}

function addBox(box) {
  return prompt(() => newObject({box}));
}

// ---------------------------------------------------------------- mouse
function imagePoint(ev) {
  const r = $("canvas").getBoundingClientRect();
  const x = Math.min(Math.max((ev.clientX - r.left) / view.scale, 0), S.image.width - 1e-3);
  const y = Math.min(Math.max((ev.clientY - r.top) / view.scale, 0), S.image.height - 1e-3);
  return [Math.round(x * 10) / 10, Math.round(y * 10) / 10];
}

let press = null;
function onDown(ev) {
  if (!S.image || ev.button === 1) return;
  ev.preventDefault();
  press = {x: ev.clientX, y: ev.clientY, p: imagePoint(ev), button: ev.button, alt: ev.altKey};
}
function onMove(ev) {
  if (!press || press.button !== 0) return;
  if (Math.hypot(ev.clientX - press.x, ev.clientY - press.y) < DRAG_PX) return;
  const q = imagePoint(ev);
  draw([Math.min(press.p[0], q[0]), Math.min(press.p[1], q[1]), Math.max(press.p[0], q[0]), Math.max(press.p[1], q[1])]);
}
function onUp(ev) {
  if (!press) return;
  const p = press; press = null;
  const q = imagePoint(ev);
  if (p.button === 0 && Math.hypot(ev.clientX - p.x, ev.clientY - p.y) >= DRAG_PX) {
    addBox([Math.min(p.p[0], q[0]), Math.min(p.p[1], q[1]), Math.max(p.p[0], q[0]), Math.max(p.p[1], q[1])]);
  } else {
    addPoint(p.p[0], p.p[1], p.button === 2 || p.alt ? 0 : 1);
  }
}

// ---------------------------------------------------------------- opening images
function base64DataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("cannot read the file"));
    reader.readAsDataURL(file);
  });
}

async function showImage(blob, name) {
  let bitmap;
  try { bitmap = await createImageBitmap(blob); } catch (e) { throw new Error(`${name}: the browser cannot read this image`); }
  S.image = {name, width: bitmap.width, height: bitmap.height, bitmap, imageId: null, folder: false};
  S.objects = []; S.current = null; S.past = []; S.future = []; maskCache.clear();
  $("drop-hint").hidden = true;
  $("image-name").textContent = `${name} · ${bitmap.width} × ${bitmap.height}`;
  layout(); renderList();
}

async function openFile(file) {
  if (!file) return;
  if (S.folder) { status("Folder mode: images come from the server's folder.", "error"); return; }
  await S.queue;
  try {
    const size = Math.ceil(file.size / 3) * 4 + 200;
    if (S.config.max_body_bytes && size > S.config.max_body_bytes) {
      throw new Error(`Too large for this server: ${file.name} is ${(file.size / 1048576).toFixed(1)} MB, ` +
                      `the server takes requests up to ${(S.config.max_body_bytes / 1048576).toFixed(1)} MB`);
    }
    await showImage(file, file.name || "pasted image");
    const image = S.image;
    status(`Embedding ${image.name} (${image.width} × ${image.height})…`, "busy");
    const value = await base64DataUrl(file);
    const answer = await api("POST", "/sam2/embed_image", {image: {type: "base64", value}, sam2_version_id: S.config.version});
    image.imageId = answer.image_id;
    status(`Ready: embedded in ${answer.time.toFixed(2)} s. Drag a box or click on an object.`);
  } catch (e) {
    status(e.message, "error");
  }
}

// ---------------------------------------------------------------- folder mode
async function loadFolder() {
  const listing = await api("GET", "/page/folder");
  S.folder = listing;
  $("folder-nav").hidden = false;
  document.querySelector("option[value=folder]").hidden = false;
  const select = $("image-list");
  select.textContent = "";
  listing.images.forEach((im, i) => {
    const opt = document.createElement("option");
    opt.value = i; opt.textContent = `${im.name}${im.objects ? ` (${im.objects})` : ""}`;
    select.append(opt);
  });
  if (!listing.images.length) { status("The folder has no images.", "error"); return; }
  const wanted = decodeURIComponent(location.hash.slice(1));
  let index = listing.images.findIndex((im) => im.name === wanted);
  if (index < 0) index = Math.max(0, listing.images.findIndex((im) => !im.saved));
  await openFolderImage(index);
}

async function openFolderImage(index) {
  const images = S.folder.images;
  if (index < 0 || index >= images.length) return;
  await S.queue; await S.saving;
  const name = images[index].name;
  S.folder.index = index;
  $("image-list").value = index;
  history.replaceState(null, "", "#" + encodeURIComponent(name));
  const path = encodeURIComponent(name).replace(/%2F/g, "/");
  try {
    const blob = await api("GET", `/page/folder/file/${path}`, undefined, true);
    await showImage(blob, name);
    S.image.folder = true;
    const image = S.image;
    status(`Embedding ${name} (${image.width} × ${image.height}), image ${index + 1} of ${images.length}…`, "busy");
    const [embedded, saved] = await Promise.all([
      api("POST", "/page/folder/embed", {name, sam2_version_id: S.config.version}),
      api("GET", `/page/folder/objects/${path}`),
    ]);
    if (S.image !== image) return;  // another image was opened meanwhile
    image.imageId = embedded.image_id;
    S.objects = saved.objects.map((o) => {
      const id = S.nextId++;
      const p = o.prompt || {};
      return {id, label: o.label, color: COLORS[(id - 1) % COLORS.length], box: p.box || null, points: p.points || [],
              rle: o.rle, score: o.score};
    });
    S.current = null;
    refresh();
    status(`Ready: ${name} (${index + 1} of ${images.length}), ${S.objects.length} saved object(s); ` +
           `embedded in ${embedded.time.toFixed(2)} s.`);
  } catch (e) {
    status(e.message, "error");
  }
}

function wireObjects() {
  return S.objects.filter((o) => o.rle).map((o) => ({label: o.label, rle: o.rle, score: o.score,
                                                     prompt: {box: o.box, points: o.points}}));
}

function save() {
  if (!S.image || !S.image.folder) return S.saving;
  const name = S.image.name, objects = wireObjects();
  const path = encodeURIComponent(name).replace(/%2F/g, "/");
  $("save-state").textContent = "saving…";
  S.saving = S.saving.then(async () => {
    try {
      await api("PUT", `/page/folder/objects/${path}`, {objects});
      S.saveError = null;
      const im = S.folder.images.find((i) => i.name === name);
      im.objects = objects.length; im.saved = true;
      const opt = $("image-list").options[S.folder.images.indexOf(im)];
      opt.textContent = `${name}${objects.length ? ` (${objects.length})` : ""}`;
      $("save-state").textContent = "saved";
    } catch (e) {
      S.saveError = e.message;
      $("save-state").textContent = "NOT saved";
      status(`Not saved: ${e.message}`, "error");
    }
  });
  return S.saving;
}

// ---------------------------------------------------------------- export
function download(name, blob) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = name;
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

async function exportJson(format) {
  if (format === "folder") return api("GET", "/page/folder/coco");
  return api("POST", "/page/export", {file_name: S.image.name, width: S.image.width, height: S.image.height,
                                      labels: S.config.labels, format, objects: wireObjects()});
}

function maskPng(o) {
  const [h, w] = o.rle.size;
  const canvas = document.createElement("canvas");
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, w, h);
  ctx.drawImage(maskCanvas(o.rle, "#ffffff", 255), 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

async function exportCurrent() {
  if (!S.image) return;
  const format = $("export-format").value;
  const base = S.image.name.replace(/\.[^.\/]*$/, "").replace(/[\/\\]/g, "_") || "image";
  try {
    if (format === "png") {
      const objects = S.objects.filter((o) => o.rle);
      for (const [i, o] of objects.entries()) download(`${base}_${i + 1}_${o.label}.png`, await maskPng(o));
      status(`Exported ${objects.length} PNG mask(s).`);
      return;
    }
    const doc = await exportJson(format);
    const name = format === "folder" ? "annotations.coco.json" : `${base}.${format === "roboflow" ? "predictions" : "coco"}.json`;
    download(name, new Blob([JSON.stringify(doc)], {type: "application/json"}));
    status(`Exported ${name}.`);
  } catch (e) {
    status(e.message, "error");
  }
}

// ---------------------------------------------------------------- keys and start-up
function onKey(ev) {
  if (ev.target.tagName === "INPUT" || ev.target.tagName === "SELECT") {
    if (ev.key === "Enter" && ev.target.id === "label") { relabel(currentLabel()); ev.target.blur(); }
    if (ev.key === "Escape") ev.target.blur();
    return;
  }
  const k = ev.key, ctrl = ev.ctrlKey || ev.metaKey;
  if (ctrl && (k === "z" || k === "Z")) { ev.shiftKey ? redo() : undo(); }
  else if (ctrl && (k === "y" || k === "Y")) redo();
  else if (ctrl) return;
  else if (k === "n" || k === "N" || k === "Escape") select(null);
  else if (k === "Delete" || k === "Backspace") deleteCurrent();
  else if (k === "Tab" && S.objects.length) {
    const i = S.objects.findIndex((o) => o.id === S.current);
    select(S.objects[(i + 1) % S.objects.length].id);
  } else if (/^[1-9]$/.test(k) && S.config.labels[Number(k) - 1]) {
    $("label").value = S.config.labels[Number(k) - 1]; relabel(S.config.labels[Number(k) - 1]);
  } else if (k === "l" || k === "L") $("label").focus();
  else if (k === "o" || k === "O") $("file").click();
  else if (k === "e" || k === "E") exportCurrent();
  else if (S.folder && (k === "ArrowRight" || k === "d" || k === "D")) openFolderImage(S.folder.index + 1);
  else if (S.folder && (k === "ArrowLeft" || k === "a" || k === "A")) openFolderImage(S.folder.index - 1);
  else return;
  ev.preventDefault();
}

async function start() {
  try {
    S.config = await api("GET", "/page/config");
  } catch (e) { status(e.message, "error"); return; }
  $("key-button").hidden = !S.config.auth;
  const datalist = $("labels");
  for (const label of S.config.labels) {
    const opt = document.createElement("option"); opt.value = label; datalist.append(opt);
  }
  if (S.config.labels.length) $("label").value = S.config.labels[0];
  if (S.config.auth && !S.key) await askKey("");
  if (S.config.folder) { try { await loadFolder(); } catch (e) { status(e.message, "error"); } }
}

const canvas = $("canvas");
canvas.addEventListener("mousedown", onDown);
window.addEventListener("mousemove", onMove);
window.addEventListener("mouseup", onUp);
canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());
window.addEventListener("resize", layout);
window.addEventListener("keydown", onKey);
$("file").addEventListener("change", (ev) => openFile(ev.target.files[0]));
const stage = $("stage");
stage.addEventListener("dragover", (ev) => { ev.preventDefault(); stage.classList.add("dragging"); });
stage.addEventListener("dragleave", () => stage.classList.remove("dragging"));
stage.addEventListener("drop", (ev) => {
  ev.preventDefault(); stage.classList.remove("dragging");
  openFile([...ev.dataTransfer.files].find((f) => f.type.startsWith("image/")));
});
window.addEventListener("paste", (ev) => {
  const item = [...(ev.clipboardData || {items: []}).items].find((i) => i.type.startsWith("image/"));
  if (item) openFile(item.getAsFile());
});
$("new-object").onclick = () => select(null);
$("delete-object").onclick = deleteCurrent;
$("undo").onclick = undo;
$("redo").onclick = redo;
$("label").addEventListener("change", () => relabel(currentLabel()));
$("export").onclick = exportCurrent;
$("key-button").onclick = () => askKey("");
$("prev").onclick = () => openFolderImage(S.folder.index - 1);
$("next").onclick = () => openFolderImage(S.folder.index + 1);
$("image-list").onchange = (ev) => openFolderImage(Number(ev.target.value));

// For scripts and tests: the state, and the page's own actions.
window.sam2flowPage = {state: S, exportJson, undo, redo, select, relabel, openFolderImage,
                       idle: () => S.queue.then(() => S.saving),  // decodes, then the saves they started
                       toClient: (x, y) => {
                         const r = $("canvas").getBoundingClientRect();
                         return [r.left + x * view.scale, r.top + y * view.scale];
                       }};
start();
