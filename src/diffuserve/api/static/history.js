// diffuserve playground: the gallery and its history in IndexedDB.
"use strict";

// The history: every image the page made, one IndexedDB record each with all it takes to make it again, kept
// across reloads, newest first, the oldest evicted past HISTORY_MAX. Where IndexedDB is refused (a private
// window of some browsers) the gallery holds this page's images only and says so.
const HISTORY_DB = "diffuserve-playground";
const HISTORY_STORE = "images";
const HISTORY_MAX = 200;
// db: the open database, null while history is off; ready: settles once the stored images are shown.
const archive = { db: null, ready: Promise.resolve(null) };

function idbResult(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

function idbDone(transaction) {
  return new Promise((resolve, reject) => {
    transaction.oncomplete = () => resolve();
    transaction.onerror = transaction.onabort = () => reject(transaction.error || new Error("aborted"));
  });
}

// Async, so that an open() that throws (as some private windows do) rejects instead.
async function openHistory() {
  if (!window.indexedDB) throw new Error("this browser has no IndexedDB");
  const request = indexedDB.open(HISTORY_DB, 1);
  request.onupgradeneeded = () => {
    request.result.createObjectStore(HISTORY_STORE, { keyPath: "id", autoIncrement: true });
  };
  return idbResult(request);
}

// Every stored entry, newest request first, a request's images in their order.
async function historyAll() {
  if (!archive.db) return [];
  const store = archive.db.transaction(HISTORY_STORE).objectStore(HISTORY_STORE);
  const entries = await idbResult(store.getAll());
  return entries.sort((a, b) => b.created - a.created || a.id - b.id);
}

// Stores the entries (setting their ids), then evicts the oldest past HISTORY_MAX; the evicted ids.
async function historyAdd(entries) {
  const transaction = archive.db.transaction(HISTORY_STORE, "readwrite");
  const store = transaction.objectStore(HISTORY_STORE);
  const added = entries.map((entry) => idbResult(store.add(entry)));
  const evicted = [];
  store.count().onsuccess = (event) => {
    let extra = event.target.result - HISTORY_MAX;
    if (extra <= 0) return;
    store.openCursor().onsuccess = (next) => {
      const cursor = next.target.result;
      if (!cursor || extra-- <= 0) return;
      evicted.push(cursor.key);
      cursor.delete();
      cursor.continue();
    };
  };
  const [ids] = await Promise.all([Promise.all(added), idbDone(transaction)]);
  entries.forEach((entry, i) => (entry.id = ids[i]));
  return evicted;
}

async function historyChange(change) {
  const transaction = archive.db.transaction(HISTORY_STORE, "readwrite");
  change(transaction.objectStore(HISTORY_STORE));
  await idbDone(transaction);
}

// The record of one image. params: the body that makes this very image again (the request's fields with the
// image's own seed, as digits, and n 1); batch: the request it came in; answer: what the server said of it.
function newEntry(record, image, seed, index, answer) {
  const entry = {
    created: record.created,
    kind: record.kind,
    params: { ...record.fields, n: 1, seed },
    batch: { n: record.fields.n, index, seed: record.seed ?? null },
    answer: { ...answer, tier: (/-([a-z]+)-bs\d+$/.exec(answer.model || "") || [])[1] || null },
    defaults: record.defaults,
    timing: null,
    image,
  };
  if (record.kind === "edit") {
    Object.assign(entry, { source: record.source, source_name: record.sourceName, mask: record.mask });
  }
  return entry;
}

function itemOf(entry) {
  const { prompt, seed } = entry.params;
  const url = URL.createObjectURL(entry.image);
  const filename = fileName(entry, entry.answer.output_format);
  return { url, blob: entry.image, seed, prompt, filename, entry };
}

// diffuserve-<prompt's first words>-<seed>.<ext>
function fileName(entry, extension) {
  const slug = entry.params.prompt
    .toLowerCase()
    .replace(/[^\p{L}\p{N}]+/gu, "-")
    .slice(0, 40)
    .replace(/^-+|-+$/g, "");
  return `diffuserve-${slug ? slug + "-" : ""}${entry.params.seed}.${extension}`;
}

// One line of what made the image; the card's title holds the rest.
function describe(entry) {
  const { params, answer, defaults } = entry;
  const steps = params.num_inference_steps ?? defaults.steps;
  const guidance = params.guidance_scale ?? defaults.guidance;
  const parts = [answer.model || params.model, answer.size];
  if (steps != null) parts.push(`${steps} steps`);
  if (guidance != null) parts.push(`guidance ${guidance}`);
  parts.push(`seed ${params.seed}`);
  for (const lora of params.loras || []) parts.push(`${lora.name} ×${lora.scale}`);
  if (entry.kind === "edit") {
    const strength = params.strength != null ? `, strength ${params.strength}` : "";
    parts.push(`edit${entry.mask ? " with mask" : ""}${strength}`);
  }
  if (params.negative_prompt) parts.push("negative prompt");
  if (answer.quality && answer.quality !== "auto") parts.push(`quality ${answer.quality}`);
  if (entry.batch.n > 1) parts.push(`image ${entry.batch.index + 1} of ${entry.batch.n}`);
  parts.push(answer.output_format);
  const took = entry.timing && entry.timing["round trip (browser)"];
  if (took != null) parts.push(took < 1000 ? `${Math.round(took)} ms` : `${(took / 1000).toFixed(1)} s`);
  return parts.filter(Boolean).join(" · ");
}

// The entry as JSON, seeds as numbers (they may pass 2^53, so written from their digits).
function paramsJson(entry) {
  const { image, source, mask, id, created, ...rest } = entry;
  const kept = { ...rest, created: new Date(created).toISOString() };
  if (entry.kind === "edit") Object.assign(kept, { mask: Boolean(mask) });
  kept.endpoint = entry.kind === "edit" ? "/v1/images/edits" : "/v1/images/generations";
  return JSON.stringify(kept, null, 2).replace(/"seed": "(\d+)"/g, '"seed": $1') + "\n";
}

function saveFile(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.click();
  window.setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function historyCard(item) {
  const { entry } = item;
  const figure = document.createElement("figure");
  figure.className = "card";
  if (entry.id !== undefined) figure.dataset.id = entry.id;
  const img = document.createElement("img");
  img.src = item.url;
  img.alt = `${item.prompt} (seed ${item.seed})`;
  img.addEventListener("load", () => img.classList.toggle("pixel", img.naturalWidth < 256));
  const caption = document.createElement("figcaption");
  const prompt = document.createElement("span");
  prompt.className = "prompt";
  prompt.textContent = item.prompt;
  const summary = document.createElement("span");
  summary.className = "summary";
  summary.textContent = describe(entry);
  const when = document.createElement("time");
  when.className = "when";
  when.dateTime = new Date(entry.created).toISOString();
  when.textContent = new Date(entry.created).toLocaleString();
  const negative = entry.params.negative_prompt;
  figure.title = [item.prompt, negative && `not: ${negative}`, summary.textContent].filter(Boolean).join("\n");
  const actions = document.createElement("span");
  actions.className = "card-actions";
  actions.append(
    linkButton("load", "put every parameter of this image in the form", "link load", () => loadEntry(entry)),
    linkButton("re-run", "make this image again with every parameter", "link rerun", () => rerunEntry(entry)),
    editButton(item),
    downloadLink(item),
    linkButton("params", "download the parameters as JSON", "link params", () =>
      saveFile(new Blob([paramsJson(entry)], { type: "application/json" }), fileName(entry, "json")),
    ),
    linkButton("delete", "remove this image from the history", "link delete", () => forget(item)),
  );
  caption.append(prompt, summary, when, actions);
  figure.append(img, caption);
  item.card = figure;
  return figure;
}

function showGallery() {
  $("gallery-box").hidden = state.gallery.length === 0 && archive.db !== null;
  $("gallery-count").textContent = state.gallery.length ? `(${state.gallery.length})` : "";
}

// Every finished image joins the gallery, and the history where there is one.
function keep(items) {
  if (!items.length) return;
  state.gallery.unshift(...items);
  $("gallery").prepend(...items.map(historyCard));
  showGallery();
  const stored = archive.ready.then(async (db) => {
    if (!db) return;
    let evicted;
    try {
      evicted = await historyAdd(items.map((item) => item.entry));
    } catch (error) {
      historyNote(`These images could not be kept in the history: ${error.message}`);
      return;
    }
    for (const item of items) if (item.card) item.card.dataset.id = item.entry.id;
    for (const id of evicted) {
      const old = state.gallery.find((item) => item.entry.id === id);
      if (old) drop(old);
    }
    showGallery();
  });
  for (const item of items) item.stored = stored;
}

// Out of the page; its URL stays while the result panel shows it.
function drop(item) {
  state.gallery = state.gallery.filter((one) => one !== item);
  if (item.card) item.card.remove();
  const shown = Array.from($("result-images").querySelectorAll("img"), (img) => img.src);
  if (!shown.includes(item.url)) URL.revokeObjectURL(item.url);
}

async function forget(item) {
  await item.stored;
  if (archive.db && item.entry.id !== undefined) {
    try {
      await historyChange((store) => store.delete(item.entry.id));
    } catch (error) {
      historyNote(`The image could not be deleted: ${error.message}`);
      return;
    }
  }
  drop(item);
  showGallery();
}

// Two clicks: the first asks, the second (within a few seconds) clears.
function clearGallery() {
  const button = $("clear-gallery");
  if (!button.dataset.armed) {
    button.dataset.armed = window.setTimeout(() => disarm(button), 4000);
    button.textContent = "click again to clear it all";
    return;
  }
  disarm(button);
  const items = state.gallery;
  Promise.all(items.map((item) => item.stored)).then(async () => {
    if (archive.db) {
      try {
        await historyChange((store) => store.clear());
      } catch (error) {
        historyNote(`The history could not be cleared: ${error.message}`);
        return;
      }
    }
    items.forEach(drop);
    showGallery();
  });
}

function disarm(button) {
  window.clearTimeout(Number(button.dataset.armed));
  delete button.dataset.armed;
  button.textContent = archive.db ? "clear history" : "clear";
}

function historyNote(text) {
  $("history-note").textContent = text;
  $("history-note").hidden = !text;
}

// Opens the history and shows what it holds; images made meanwhile are stored once it is open.
function initHistory() {
  archive.ready = openHistory()
    .then(async (db) => {
      archive.db = db;
      db.onversionchange = () => db.close();
      const entries = await historyAll();
      const items = entries.map(itemOf);
      state.gallery.push(...items);
      $("gallery").append(...items.map(historyCard));
      $("gallery-title").textContent = "History";
      $("gallery-hint").textContent = `kept in this browser, the last ${HISTORY_MAX}`;
      historyNote("");
      return db;
    })
    .catch((error) => {
      archive.db = null;
      historyNote(
        `History is off (${error.message || error.name}): this browser keeps no storage for this page, ` +
          "as in a private window. The images stay until the page is reloaded.",
      );
      return null;
    })
    .finally(() => {
      disarm($("clear-gallery"));
      showGallery();
    });
}
