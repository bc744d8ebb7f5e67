// The tagger page: posts each image to /v1/tag and /v1/attention and draws the answers.
"use strict";

const VIEW = 256;  // the canvas shows the model's center crop at this size
const $ = (id) => document.getElementById(id);
const cards = [];  // {file, bitmap, card} per image shown

async function api(path, file, params) {
  const query = new URLSearchParams(params).toString();
  const res = await fetch(`${path}?${query}`, {
    method: "POST", body: file, headers: {"Content-Type": file.type || "application/octet-stream"},
  });
  const body = await res.json();
  if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

function tagParams() {
  const p = {num_labels: $("num_labels").value, min_prob: $("min_prob").value};
  if ($("vocab").value) p.vocab = $("vocab").value;
  return p;
}

function drawImage(canvas, bitmap) {
  // The model's view: the short side's center square (resize + center crop).
  const side = Math.min(bitmap.width, bitmap.height);
  const sx = (bitmap.width - side) / 2, sy = (bitmap.height - side) / 2;
  canvas.width = canvas.height = VIEW;
  canvas.getContext("2d").drawImage(bitmap, sx, sy, side, side, 0, 0, VIEW, VIEW);
}

function heat(t) {
  // 0 -> transparent blue, 1 -> opaque red, through yellow.
  const r = Math.round(255 * Math.min(1, 2 * t));
  const g = Math.round(255 * (t < 0.5 ? 2 * t : 2 - 2 * t));
  const b = Math.round(255 * Math.max(0, 1 - 2 * t));
  return [r, g, b, Math.round(40 + 150 * t)];
}

function drawOverlay(canvas, grid) {
  const g = grid.length;
  const flat = grid.flat();
  const lo = Math.min(...flat), hi = Math.max(...flat);
  const small = document.createElement("canvas");
  small.width = small.height = g;
  const ctx = small.getContext("2d");
  const img = ctx.createImageData(g, g);
  flat.forEach((v, i) => img.data.set(heat((v - lo) / (hi - lo + 1e-12)), 4 * i));
  ctx.putImageData(img, 0, 0);
  canvas.width = canvas.height = VIEW;
  const out = canvas.getContext("2d");
  out.imageSmoothingEnabled = true;
  out.clearRect(0, 0, VIEW, VIEW);
  out.drawImage(small, 0, 0, VIEW, VIEW);
  canvas.dataset.drawn = "1";
}

function showLabels(list, labels) {
  list.replaceChildren();
  if (labels.length === 0) {
    const li = document.createElement("li");
    li.textContent = "no label above min prob";
    list.append(li);
  }
  for (const {label, prob} of labels) {
    const li = document.createElement("li");
    li.className = "label";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = label === "" ? "(empty)" : label;  // a branch that sampled the delimiter first
    name.title = label;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${(100 * prob).toFixed(1)}%`;
    bar.append(fill);
    const p = document.createElement("span");
    p.className = "prob";
    p.textContent = prob.toFixed(3);
    li.append(name, bar, p);
    list.append(li);
  }
}

async function refresh(entry) {
  const {file, card} = entry;
  const status = card.querySelector(".error");
  status.textContent = "";
  card.dataset.state = "tagging";
  try {
    const [tags, attn] = await Promise.all([
      api("/v1/tag", file, tagParams()),
      api("/v1/attention", file, {layer: $("layer").value, head: $("head").value}),
    ]);
    showLabels(card.querySelector(".labels"), tags.labels);
    drawOverlay(card.querySelector(".overlay"), attn.grid);
    card.dataset.state = "done";
  } catch (e) {
    status.textContent = e.message;
    card.dataset.state = "error";
  }
}

async function add(file) {
  const card = document.createElement("div");
  card.className = "card";
  card.innerHTML = '<h2></h2><div class="view"><canvas class="image"></canvas><canvas class="overlay"></canvas></div>' +
    '<ul class="labels"></ul><p class="error"></p>';
  card.querySelector("h2").textContent = file.name;
  card.querySelector(".overlay").hidden = !$("show_overlay").checked;
  $("results").prepend(card);
  const entry = {file, card};
  cards.push(entry);
  try {
    drawImage(card.querySelector(".image"), await createImageBitmap(file));
  } catch (e) {
    card.querySelector(".error").textContent = `the browser cannot show this file: ${e.message}`;
  }
  await refresh(entry);
}

function addAll(files) {
  const images = [...files].filter((f) => f.type.startsWith("image/"));
  $("status").textContent = images.length ? "" : "drop image files (JPEG, PNG, WebP)";
  images.forEach(add);
}

function options(select, n, selected) {
  select.replaceChildren(...Array.from({length: n}, (_, i) => new Option(String(i), String(i), false, i === selected)));
}

async function init() {
  const info = await (await fetch("/v1/info")).json();
  $("num_labels").max = info.max_num_labels;
  $("num_labels").value = info.default_num_labels;
  for (const name of info.vocabs) $("vocab").append(new Option(name, name));
  options($("layer"), info.num_layers, info.num_layers - 1);
  options($("head"), info.num_heads, 0);
  $("files").addEventListener("change", (e) => addAll(e.target.files));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addAll(e.dataTransfer.files); });
  for (const id of ["num_labels", "min_prob", "vocab", "layer", "head"]) {
    $(id).addEventListener("change", () => cards.forEach(refresh));
  }
  $("show_overlay").addEventListener("change", (e) => {
    document.querySelectorAll(".overlay").forEach((c) => { c.hidden = !e.target.checked; });
  });
  document.body.dataset.ready = "1";
}

init().catch((e) => { $("status").textContent = `cannot reach the server: ${e.message}`; });
