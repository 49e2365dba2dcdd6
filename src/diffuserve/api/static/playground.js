// diffuserve playground: a form over this server's own POST /v1/images/generations (JSON, b64_json).
// No framework and no build step; every request goes to the origin that served the page.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "diffuserve.apiKey";
const SEED_PATTERN = /^\d{1,19}$/;
const MAX_SEED = 2n ** 63n - 1n;
const state = { card: null, lastSeed: null, controller: null, timer: null, gallery: [] };

function authHeaders(extra) {
  const headers = { ...extra };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  return headers;
}

function setStatus(kind, text) {
  const pill = $("model-status");
  pill.dataset.state = kind;
  pill.textContent = text;
}

function showKeyBox(message) {
  $("key-box").hidden = false;
  setStatus("locked", message);
}

// Reads what the form needs from GET /v1/models; the card's extension fields stay null until the model loads.
async function loadModel() {
  let response;
  try {
    response = await fetch("v1/models", { headers: authHeaders({ Accept: "application/json" }) });
  } catch {
    setStatus("error", "server unreachable");
    window.setTimeout(loadModel, 3000);
    return;
  }
  if (response.status === 401) {
    showKeyBox($("api-key").value.trim() ? "API key refused" : "API key needed");
    return;
  }
  if (!response.ok) {
    setStatus("error", `models: HTTP ${response.status}`);
    return;
  }
  const card = ((await response.json()).data || [])[0];
  if (!card) {
    setStatus("error", "no model served");
    return;
  }
  state.card = card;
  if (card.supports_negative_prompt == null) {
    setStatus("loading", `${card.id} loading…`);
    window.setTimeout(loadModel, 2000);
    return;
  }
  setStatus("ready", card.id);
  $("negative-box").hidden = !card.supports_negative_prompt;
  $("steps").placeholder = `default ${card.default_steps}`;
  $("guidance").placeholder = `default ${card.default_guidance}`;
  $("size").options[0].textContent = `model default (${card.default_size})`;
}

class FormError extends Error {
  constructor(message, field) {
    super(message);
    this.field = field;
  }
}

function optionalNumber(id, label, parse) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = parse(raw);
  if (!Number.isFinite(value)) throw new FormError(`${label} must be a number, got "${raw}"`, id);
  return value;
}

// The request body as JSON text. The seed is spliced in as digits: seeds reach 2^63-1, past what a
// JavaScript number holds exactly.
function buildBody() {
  const prompt = $("prompt").value.trim();
  if (!prompt) throw new FormError("Write a prompt first.", "prompt");
  const body = {
    prompt,
    n: optionalNumber("n", "Images", Number) ?? 1,
    output_format: $("format").value,
    response_format: "b64_json",
  };
  if (!$("negative-box").hidden && $("negative-prompt").value.trim()) {
    body.negative_prompt = $("negative-prompt").value.trim();
  }
  const size = $("size").value;
  if (size === "custom") {
    body.width = optionalNumber("width", "Width", Number);
    body.height = optionalNumber("height", "Height", Number);
    if (body.width === undefined || body.height === undefined) {
      throw new FormError("A custom size needs both width and height.", "width");
    }
  } else if (size) {
    body.aspect_ratio = size;
  }
  const steps = optionalNumber("steps", "Steps", Number);
  if (steps !== undefined) body.num_inference_steps = steps;
  const guidance = optionalNumber("guidance", "Guidance", Number);
  if (guidance !== undefined) body.guidance_scale = guidance;
  const seed = $("seed").value.trim();
  if (seed === "") return JSON.stringify(body);
  if (!SEED_PATTERN.test(seed) || BigInt(seed) > MAX_SEED) {
    throw new FormError(`Seed must be a whole number from 0 to ${MAX_SEED}, or empty for random.`, "seed");
  }
  return JSON.stringify(body).slice(0, -1) + `,"seed":${BigInt(seed)}}`;
}

// Server-Timing: comma-separated `name;dur=ms;desc="…"` entries; quoted strings may hold , and ;.
function splitOutsideQuotes(text, separator) {
  const parts = [];
  let current = "";
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (ch === '"') quoted = !quoted;
    else if (ch === "\\" && quoted) current += text[i++];
    else if (ch === separator && !quoted) {
      parts.push(current);
      current = "";
      continue;
    }
    current += ch;
  }
  parts.push(current);
  return parts.map((part) => part.trim()).filter(Boolean);
}

function parseServerTiming(header) {
  if (!header) return [];
  return splitOutsideQuotes(header, ",").map((entry) => {
    const [name, ...params] = splitOutsideQuotes(entry, ";");
    const metric = { name, dur: null, desc: "" };
    for (const param of params) {
      const at = param.indexOf("=");
      if (at < 0) continue;
      const key = param.slice(0, at).trim().toLowerCase();
      let value = param.slice(at + 1).trim();
      if (value.startsWith('"') && value.endsWith('"')) value = value.slice(1, -1).replace(/\\(.)/g, "$1");
      if (key === "dur" && metric.dur === null) metric.dur = Number(value);
      else if (key === "desc" && !metric.desc) metric.desc = value;
    }
    return metric;
  });
}

function timingRows(response, roundTripMs) {
  const rows = [{ label: "round trip (browser)", ms: roundTripMs, group: "browser" }];
  for (const name of ["x-queue-ms", "x-inference-ms"]) {
    const value = response.headers.get(name);
    if (value !== null) rows.push({ label: name, ms: Number(value), group: "header" });
  }
  for (const metric of parseServerTiming(response.headers.get("server-timing"))) {
    rows.push({ label: metric.name, ms: metric.dur, desc: metric.desc, group: "server-timing" });
  }
  return rows;
}

function renderTiming(rows, response) {
  const body = $("timing").tBodies[0];
  body.replaceChildren();
  const total = rows[0].ms || 1;
  for (const row of rows) {
    const tr = body.insertRow();
    tr.dataset.group = row.group;
    tr.insertCell().textContent = row.group === "server-timing" ? `server-timing: ${row.label}` : row.label;
    tr.insertCell().textContent = row.ms === null || Number.isNaN(row.ms) ? "–" : `${row.ms.toFixed(1)} ms`;
    const barCell = tr.insertCell();
    if (row.ms) {
      const bar = document.createElement("span");
      bar.className = "timing-bar";
      bar.style.width = `${Math.min(100, (100 * row.ms) / total)}%`;
      barCell.append(bar);
    }
    if (row.desc) tr.title = row.desc;
  }
  for (const name of ["x-batch-size", "x-model", "x-request-id"]) {
    const value = response.headers.get(name);
    if (value === null) continue;
    const tr = body.insertRow();
    tr.dataset.group = "info";
    tr.insertCell().textContent = name;
    const cell = tr.insertCell();
    cell.colSpan = 2;
    cell.textContent = value;
  }
}

function imageCard(item, { compact }) {
  const figure = document.createElement("figure");
  figure.className = "card";
  const img = document.createElement("img");
  img.src = item.url;
  img.alt = `${item.prompt} (seed ${item.seed})`;
  img.addEventListener("load", () => img.classList.toggle("pixel", img.naturalWidth < 256));
  const caption = document.createElement("figcaption");
  if (compact) {
    const prompt = document.createElement("span");
    prompt.className = "prompt";
    prompt.textContent = item.prompt;
    prompt.title = item.prompt;
    caption.append(prompt);
  }
  const seed = document.createElement("span");
  seed.className = "seed-value";
  seed.textContent = `seed ${item.seed}`;
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.className = "link";
  reuse.textContent = "reuse";
  reuse.title = "put this seed in the form";
  reuse.addEventListener("click", () => {
    $("seed").value = item.seed;
  });
  const download = document.createElement("a");
  download.href = item.url;
  download.download = item.filename;
  download.textContent = "download";
  caption.append(seed, reuse, download);
  figure.append(img, caption);
  return figure;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").hidden = !busy;
  $("progress").hidden = !busy;
  if (busy) {
    const started = performance.now();
    $("elapsed").textContent = "0.0 s";
    state.timer = window.setInterval(() => {
      $("elapsed").textContent = `${((performance.now() - started) / 1000).toFixed(1)} s`;
    }, 100);
  } else {
    window.clearInterval(state.timer);
  }
}

function b64ToBlob(b64, type) {
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return new Blob([bytes], { type });
}

async function generate() {
  $("error").hidden = true;
  let body;
  try {
    body = buildBody();
  } catch (error) {
    if (!(error instanceof FormError)) throw error;
    showError(error.message);
    $(error.field).focus();
    return;
  }
  const prompt = JSON.parse(body).prompt;
  state.controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let response;
  let text;
  try {
    response = await fetch("v1/images/generations", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json", Accept: "application/json" }),
      body,
      signal: state.controller.signal,
    });
    text = await response.text();
  } catch (error) {
    setBusy(false);
    showError(error.name === "AbortError" ? "Cancelled." : `The server could not be reached: ${error.message}`);
    return;
  }
  const roundTripMs = performance.now() - started;
  setBusy(false);
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try {
      const envelope = JSON.parse(text).error;
      message += `: ${envelope.message}` + (envelope.param ? ` (field: ${envelope.param})` : "");
    } catch {
      message += ` ${text.slice(0, 200)}`;
    }
    if (response.status === 401) showKeyBox("API key needed");
    showError(message);
    return;
  }
  // Keep seeds as their exact digits (JSON.parse's source text), beyond 2^53 too.
  const payload = JSON.parse(text, (key, value, context) =>
    key === "seed" && context && context.source ? context.source : value,
  );
  const format = payload.output_format;
  const items = payload.data.map((datum) => {
    const url = URL.createObjectURL(b64ToBlob(datum.b64_json, `image/${format}`));
    const seed = String(datum.seed);
    return { url, seed, prompt, size: payload.size, filename: `diffuserve-${seed}.${format}` };
  });
  state.lastSeed = items[0].seed;
  $("seed-reuse").disabled = false;
  $("empty").hidden = true;
  $("result").hidden = false;
  $("result-images").classList.toggle("many", items.length > 1);
  $("result-images").replaceChildren(...items.map((item) => imageCard(item, { compact: false })));
  renderTiming(timingRows(response, roundTripMs), response);
  state.gallery.unshift(...items);
  $("gallery").prepend(...items.map((item) => imageCard(item, { compact: true })));
  $("gallery-box").hidden = false;
}

function clearGallery() {
  const shown = new Set(Array.from($("result-images").querySelectorAll("img"), (img) => img.src));
  for (const item of state.gallery) if (!shown.has(item.url)) URL.revokeObjectURL(item.url);
  state.gallery = [];
  $("gallery").replaceChildren();
  $("gallery-box").hidden = true;
}

function init() {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadModel();
  });
  $("size").addEventListener("change", () => {
    $("custom-size").hidden = $("size").value !== "custom";
  });
  $("seed-random").addEventListener("click", () => {
    $("seed").value = "";
  });
  $("seed-reuse").addEventListener("click", () => {
    if (state.lastSeed !== null) $("seed").value = state.lastSeed;
  });
  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("form").requestSubmit();
  });
  $("cancel").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear-gallery").addEventListener("click", clearGallery);
  loadModel();
}

init();
