// The mask2former web page: upload an image, show the overlay and the segments, highlight on hover.
// Plain browser JavaScript, no build step and nothing fetched from elsewhere than this server.
"use strict";

const el = (id) => document.getElementById(id);
const state = { file: null, result: null, masks: [], controller: null };

// COCO compressed RLE string -> run lengths (cocoapi maskApi.c rleFrString). Values are 32-bit here,
// which covers every image under 2^30 pixels.
function rleCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0, k = 0, more = true;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      p += 1;
      k += 1;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// RLE {size: [h, w], counts} -> Uint8Array of h*w in column-major order (index x*h + y).
function rleDecode(rle) {
  const [h, w] = rle.size;
  const mask = new Uint8Array(h * w);
  let pos = 0, value = 0;
  for (const run of rleCounts(rle.counts)) {
    if (value) mask.fill(1, pos, pos + run);
    pos += run;
    value = 1 - value;
  }
  return mask;
}

function setStatus(text, isError = false) {
  const status = el("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function loadInfo() {
  try {
    const response = await fetch("/info");
    const info = await response.json();
    if (!response.ok) throw new Error(info.error || response.statusText);
    el("model").textContent =
      `${info.model}: ${info.classes.length} classes, trained ${info.trained ? "yes" : "no"}, ` +
      `pre-processing ${info.preprocessing.mode} (short edge ${info.preprocessing.short_edge})`;
    const select = el("task");
    select.replaceChildren(...info.tasks.map((task) => new Option(task, task, false, task === info.task)));
  } catch (error) {
    el("model").textContent = `model not ready: ${error.message}`;
    setTimeout(loadInfo, 1000);
  }
}

async function segment() {
  if (!state.file) return;
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  const params = new URLSearchParams({
    task: el("task").value, threshold: el("threshold").value, output: "json", overlay: "true",
  });
  const form = new FormData();
  form.append("image", state.file, state.file.name || "image");
  setStatus(`Segmenting ${state.file.name || "image"}...`);
  document.body.dataset.state = "busy";
  try {
    const response = await fetch(`/predict?${params}`, { method: "POST", body: form, signal: controller.signal });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    await show(answer);
    setStatus(`${answer.segments.length} segments (${answer.task}, ${answer.width}x${answer.height}).`);
    document.body.dataset.state = "done";
  } catch (error) {
    if (error.name === "AbortError") return;
    setStatus(error.message, true);
    document.body.dataset.state = "error";
  }
}

function show(answer) {
  state.result = answer;
  state.masks = answer.segments.map((segment) => rleDecode(segment.mask));
  const canvas = el("highlight");
  canvas.width = answer.width;
  canvas.height = answer.height;
  clearHighlight();
  const rows = answer.segments.map((segment, index) => {
    const row = document.createElement("tr");
    row.dataset.index = index;
    row.dataset.id = segment.id;
    row.dataset.score = segment.score;
    row.dataset.area = segment.area;
    const color = segment.color ? `rgb(${segment.color.join(",")})` : "#888";
    row.innerHTML = `<td><span class="swatch" style="background:${color}"></span></td>` +
      `<td class="name"></td><td class="num score"></td><td class="num area"></td>`;
    row.querySelector(".name").textContent = segment.class_name;
    row.querySelector(".score").textContent = segment.score.toFixed(3);
    row.querySelector(".area").textContent = String(segment.area);
    row.addEventListener("mouseenter", () => highlight(index));
    row.addEventListener("mouseleave", clearHighlight);
    return row;
  });
  el("segments").querySelector("tbody").replaceChildren(...rows);
  el("result").hidden = false;
  const overlay = el("overlay");
  return new Promise((resolve) => {
    overlay.onload = resolve;
    overlay.onerror = resolve;
    overlay.src = answer.overlay_png;
  });
}

// Dim the picture and show one segment's mask in its class colour.
function highlight(index) {
  const answer = state.result;
  if (!answer || !state.masks[index]) return;
  const { width: w, height: h } = answer;
  const mask = state.masks[index];
  const [r, g, b] = answer.segments[index].color || [255, 255, 255];
  const canvas = el("highlight");
  const context = canvas.getContext("2d");
  const picture = context.createImageData(w, h);
  const data = picture.data;
  for (let y = 0; y < h; y += 1) {
    for (let x = 0; x < w; x += 1) {
      const o = 4 * (y * w + x);
      if (mask[x * h + y]) {
        data[o] = r; data[o + 1] = g; data[o + 2] = b; data[o + 3] = 150;
      } else {
        data[o + 3] = 140;
      }
    }
  }
  context.putImageData(picture, 0, 0);
  canvas.dataset.segment = answer.segments[index].id;
  for (const row of el("segments").querySelectorAll("tbody tr")) {
    row.classList.toggle("active", Number(row.dataset.index) === index);
  }
}

function clearHighlight() {
  const canvas = el("highlight");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  delete canvas.dataset.segment;
  for (const row of el("segments").querySelectorAll("tbody tr.active")) row.classList.remove("active");
}

// Hovering the picture highlights the segment under the pointer (the last one listed wins).
function hoverPicture(event) {
  const answer = state.result;
  if (!answer) return;
  const box = el("highlight").getBoundingClientRect();
  const x = Math.floor(((event.clientX - box.left) / box.width) * answer.width);
  const y = Math.floor(((event.clientY - box.top) / box.height) * answer.height);
  if (x < 0 || y < 0 || x >= answer.width || y >= answer.height) return clearHighlight();
  for (let index = state.masks.length - 1; index >= 0; index -= 1) {
    if (state.masks[index][x * answer.height + y]) {
      if (el("highlight").dataset.segment !== String(answer.segments[index].id)) highlight(index);
      return;
    }
  }
  clearHighlight();
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  segment();
}

function setUp() {
  const drop = el("drop");
  el("file").addEventListener("change", (event) => chooseFile(event.target.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    chooseFile(event.dataTransfer.files[0]);
  });
  const slider = el("threshold");
  slider.addEventListener("input", () => { el("threshold-value").textContent = Number(slider.value).toFixed(2); });
  slider.addEventListener("change", segment);
  el("task").addEventListener("change", segment);
  el("highlight").addEventListener("mousemove", hoverPicture);
  el("highlight").addEventListener("mouseleave", clearHighlight);
  loadInfo();
}

setUp();
