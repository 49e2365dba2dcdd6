// diffuserve playground: a form over this server's own POST /v1/images/generations (JSON) and
// POST /v1/images/edits (multipart form), answered with b64_json or, with previews, an event stream.
// No framework and no build step; every request goes to the origin that served the page.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "diffuserve.apiKey";
const SEED_PATTERN = /^\d{1,19}$/;
const MAX_SEED = 2n ** 63n - 1n;
// The server's strength when none is sent (README "Edits"): image-to-image, and inpainting with a mask.
const DEFAULT_STRENGTH = { picture: 0.6, mask: 1.0 };
const state = {
  card: null,
  lastSeed: null,
  controller: null,
  timer: null,
  gallery: [],
  mode: "generate",
  rerunning: false,
};

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
  const cards = (await response.json()).data || [];
  if (!cards.length) {
    setStatus("error", "no model served");
    return;
  }
  // A server of several models: the page asks the one picked here (the first by default).
  const picker = $("model-select");
  if (picker.options.length !== cards.length) {
    picker.replaceChildren(...cards.map((one) => new Option(one.id, one.id)));
  }
  picker.hidden = cards.length < 2;
  const card = cards.find((one) => one.id === picker.value) || cards[0];
  picker.value = card.id;
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
  showDefaults();
  await loadAdapters(card.id);
}

// The adapters (GET /v1/loras) the picked model takes; the box stays hidden on a server without any.
async function loadAdapters(model) {
  let listed = [];
  try {
    const response = await fetch("v1/loras", { headers: authHeaders({ Accept: "application/json" }) });
    if (response.ok) listed = (await response.json()).data || [];
  } catch {
    listed = [];
  }
  const usable = listed.filter((one) => (one.models || []).includes(model));
  const picker = $("lora");
  const kept = picker.value;
  picker.replaceChildren(
    new Option("none", ""),
    ...usable.map((one) => new Option(`${one.id} (rank ${one.rank})`, one.id)),
  );
  picker.value = usable.some((one) => one.id === kept) ? kept : "";
  $("lora-box").hidden = usable.length === 0;
}

class FormError extends Error {
  constructor(message, field) {
    super(message);
    this.field = field;
  }
}

// A failure the server told of: an HTTP error envelope, or an error event of a stream.
class ServerError extends Error {}

function optionalNumber(id, label, parse) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = parse(raw);
  if (!Number.isFinite(value)) throw new FormError(`${label} must be a number, got "${raw}"`, id);
  return value;
}

// A stream's events carry no seed: the page picks the random seed itself, so the images still show theirs.
function randomSeed() {
  return String(crypto.getRandomValues(new BigUint64Array(1))[0] >> 1n);
}

// The fields both routes share, in the API's names. The seed stays text: seeds reach 2^63-1, past what a
// JavaScript number holds exactly.
function formFields() {
  const prompt = $("prompt").value.trim();
  if (!prompt) throw new FormError("Write a prompt first.", "prompt");
  const fields = {
    prompt,
    n: optionalNumber("n", "Images", Number) ?? 1,
    output_format: $("format").value,
    response_format: "b64_json",
  };
  if (state.card) fields.model = state.card.id;
  if (!$("negative-box").hidden && $("negative-prompt").value.trim()) {
    fields.negative_prompt = $("negative-prompt").value.trim();
  }
  if (!$("lora-box").hidden && $("lora").value) {
    const scale = optionalNumber("lora-scale", "Scale", Number) ?? 1;
    if (scale < -4 || scale > 4) throw new FormError("Scale must be from -4 to 4.", "lora-scale");
    fields.loras = [{ name: $("lora").value, scale }];
  }
  const size = $("size").value;
  if (size === "custom") {
    fields.width = optionalNumber("width", "Width", Number);
    fields.height = optionalNumber("height", "Height", Number);
    if (fields.width === undefined || fields.height === undefined) {
      throw new FormError("A custom size needs both width and height.", "width");
    }
  } else if (size) {
    fields.aspect_ratio = size;
  }
  const steps = optionalNumber("steps", "Steps", Number);
  if (steps !== undefined) fields.num_inference_steps = steps;
  const guidance = optionalNumber("guidance", "Guidance", Number);
  if (guidance !== undefined) fields.guidance_scale = guidance;
  if (state.mode === "edit") {
    const strength = optionalNumber("strength", "Strength", Number);
    if (strength !== undefined) fields.strength = strength;
  }
  if ($("previews").checked) {
    fields.stream = true;
    fields.partial_images = Number($("partial-images").value);
  }
  let seed = $("seed").value.trim();
  if (seed !== "" && (!SEED_PATTERN.test(seed) || BigInt(seed) > MAX_SEED)) {
    throw new FormError(`Seed must be a whole number from 0 to ${MAX_SEED}, or empty for random.`, "seed");
  }
  if (seed === "") seed = fields.stream ? randomSeed() : undefined;
  return { fields, seed };
}

// What the history keeps of a request: its fields but the stream's, and the model's defaults for those left
// out; an edit adds its picture and mask.
function newRecord(fields, seed) {
  const { stream, partial_images, ...kept } = fields;
  const card = state.card && state.card.id === fields.model ? state.card : {};
  const defaults = { steps: card.default_steps ?? null, guidance: card.default_guidance ?? null };
  return { kind: state.mode, fields: kept, seed, defaults, created: Date.now() };
}

// The body as JSON text, the seed written from its digits (past 2^53 a JavaScript number would round it).
function jsonWithSeed(fields, seed) {
  const body = JSON.stringify(fields);
  return seed === undefined ? body : body.slice(0, -1) + `,"seed":${seed}}`;
}

// An edit's picture and mask (null with nothing painted), kept in its history record too.
async function editPicture(record) {
  if (!editor.blob) throw new FormError("Drop or choose a picture to edit first.", "source-file");
  const mask = await maskBlob();
  Object.assign(record, { source: editor.blob, sourceName: editor.name, mask });
  return { source: editor.blob, name: editor.name, mask };
}

// What to post: JSON to generations, or to edits the multipart form OpenAI's SDK sends.
async function buildRequest() {
  const { fields, seed } = formFields();
  const stream = Boolean(fields.stream);
  const record = newRecord(fields, seed);
  const { prompt, n, partial_images: partials } = fields;
  const request = { prompt, n, stream, seed, partials, record };
  const accept = { Accept: stream ? "text/event-stream" : "application/json" };
  if (state.mode !== "edit") {
    const headers = { "Content-Type": "application/json", ...accept };
    return { ...request, url: "v1/images/generations", body: jsonWithSeed(fields, seed), headers };
  }
  const picture = await editPicture(record);
  const form = new FormData();
  form.append("image", picture.source, picture.name);
  if (picture.mask) form.append("mask", picture.mask, "mask.png");
  // A list (loras) travels as JSON text, which the server reads from a form.
  for (const [name, value] of Object.entries(fields)) {
    form.append(name, typeof value === "object" ? JSON.stringify(value) : String(value));
  }
  if (seed !== undefined) form.append("seed", seed);
  // No Content-Type: the browser writes it with the form's boundary.
  return { ...request, url: "v1/images/edits", body: form, headers: accept };
}

function envelopeText(envelope) {
  return envelope.message + (envelope.param ? ` (field: ${envelope.param})` : "");
}

function httpError(response, text) {
  let message = `HTTP ${response.status}`;
  try {
    message += `: ${envelopeText(JSON.parse(text).error)}`;
  } catch {
    message += ` ${text.slice(0, 200)}`;
  }
  if (response.status === 401) showKeyBox("API key needed");
  return new ServerError(message);
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

async function submit() {
  $("error").hidden = true;
  let request;
  try {
    request = await buildRequest();
  } catch (error) {
    if (!(error instanceof FormError)) throw error;
    showError(error.message);
    $(error.field).focus();
    return;
  }
  state.controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let response;
  let items;
  try {
    response = await fetch(request.url, {
      method: "POST",
      headers: authHeaders(request.headers),
      body: request.body,
      signal: state.controller.signal,
    });
    if (!response.ok) throw httpError(response, await response.text());
    items = request.stream
      ? await streamedItems(response, request, started)
      : jsonItems(await response.text(), request);
  } catch (error) {
    setBusy(false);
    if (error instanceof ServerError) showError(error.message);
    else if (error.name === "AbortError") showError("Cancelled.");
    else if (response) showError(`The answer broke off: ${error.message}`);
    else showError(`The server could not be reached: ${error.message}`);
    return;
  }
  const roundTripMs = performance.now() - started;
  setBusy(false);
  state.lastSeed = items[0].seed;
  $("seed-reuse").disabled = false;
  if (!request.stream) showResult(items); // a stream's images are in place already
  const rows = timingRows(response, roundTripMs, request.firstPreviewMs);
  renderTiming(rows, response);
  const timing = timingRecord(rows, response);
  for (const item of items) item.entry.timing = timing;
  keep(items);
}

// Puts every parameter of a history entry in the form, its model, picture and mask too, with the image's own
// seed and n 1; false when this server no longer serves its model.
async function fillForm(entry) {
  const params = entry.params;
  $("error").hidden = true;
  const picker = $("model-select");
  if (params.model && (!state.card || params.model !== state.card.id)) {
    if (!Array.from(picker.options).some((option) => option.value === params.model)) {
      showError(`This server does not serve ${params.model}, the model of that image.`);
      return false;
    }
    picker.value = params.model;
    await loadModel();
  }
  setMode(entry.kind);
  $("prompt").value = params.prompt;
  $("negative-prompt").value = params.negative_prompt || "";
  const lora = (params.loras || [])[0];
  const served = lora && Array.from($("lora").options).some((option) => option.value === lora.name);
  $("lora").value = served ? lora.name : "";
  $("lora-scale").value = lora ? lora.scale : 1;
  const custom = params.width !== undefined;
  $("size").value = custom ? "custom" : params.aspect_ratio || "";
  $("width").value = custom ? params.width : "";
  $("height").value = custom ? params.height : "";
  $("custom-size").hidden = !custom;
  $("steps").value = params.num_inference_steps ?? "";
  $("guidance").value = params.guidance_scale ?? "";
  $("seed").value = params.seed;
  $("n").value = params.n;
  $("format").value = params.output_format;
  $("strength").value = params.strength ?? "";
  if (params.strength !== undefined) $("strength-range").value = params.strength;
  if (entry.kind === "edit") {
    try {
      await loadSource(entry.source, entry.source_name);
      if (entry.mask) await restoreMask(entry.mask);
    } catch (error) {
      showError(error.message);
      return false;
    }
  }
  showDefaults();
  if (lora && !served) {
    showError(`The adapter ${lora.name} is not served here now: the form has none.`);
    return false;
  }
  return true;
}

async function loadEntry(entry) {
  await fillForm(entry);
  $("form").scrollIntoView({ block: "nearest" });
}

// One request at a time, as with the form's own button.
async function rerunEntry(entry) {
  if ($("generate").disabled || state.rerunning) return;
  state.rerunning = true;
  try {
    if (await fillForm(entry)) await submit();
  } finally {
    state.rerunning = false;
  }
}

// The size select's first entry and the strength's default follow the mode, the model and the mask.
function showDefaults() {
  const card = state.card && state.card.default_size ? ` (${state.card.default_size})` : "";
  $("size").options[0].textContent = state.mode === "edit" ? "the picture's size" : `model default${card}`;
  const strength = hasMask() ? DEFAULT_STRENGTH.mask : DEFAULT_STRENGTH.picture;
  $("strength").placeholder = `default ${strength.toFixed(1)}`;
  if ($("strength").value.trim() === "") $("strength-range").value = strength;
}

function setMode(mode) {
  state.mode = mode;
  const editing = mode === "edit";
  $("mode-generate").setAttribute("aria-pressed", String(!editing));
  $("mode-edit").setAttribute("aria-pressed", String(editing));
  $("edit-box").hidden = !editing;
  $("generate").textContent = editing ? "Edit" : "Generate";
  $("progress-label").textContent = editing ? "Editing…" : "Generating…";
  showDefaults();
}

function init() {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadModel();
  });
  $("model-select").addEventListener("change", loadModel);
  $("size").addEventListener("change", () => {
    $("custom-size").hidden = $("size").value !== "custom";
  });
  $("seed-random").addEventListener("click", () => {
    $("seed").value = "";
  });
  $("seed-reuse").addEventListener("click", () => {
    if (state.lastSeed !== null) $("seed").value = state.lastSeed;
  });
  $("mode-generate").addEventListener("click", () => setMode("generate"));
  $("mode-edit").addEventListener("click", () => setMode("edit"));
  $("strength-range").addEventListener("input", () => {
    $("strength").value = $("strength-range").value;
  });
  $("strength").addEventListener("input", () => {
    const value = Number($("strength").value);
    if ($("strength").value.trim() !== "" && Number.isFinite(value)) $("strength-range").value = value;
  });
  $("previews").addEventListener("change", () => {
    $("partial-images").disabled = !$("previews").checked;
  });
  initEditor({
    changed: showDefaults,
    loaded: () => setMode("edit"),
    error: showError,
    itemForUrl: (url) => state.gallery.find((item) => item.url === url),
  });
  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("form").requestSubmit();
  });
  $("cancel").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear-gallery").addEventListener("click", clearGallery);
  initJobs();
  initHistory();
  loadModel();
}

init();
