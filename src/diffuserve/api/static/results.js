// diffuserve playground: the images of an answer (JSON, or a stream's previews then images) and the gallery.
"use strict";

function makeItem(b64, format, seed, prompt) {
  const blob = b64ToBlob(b64, `image/${format}`);
  const url = URL.createObjectURL(blob);
  return { url, blob, seed, prompt, filename: `diffuserve-${seed}.${format}` };
}

function jsonItems(text, request) {
  // Keep seeds as their exact digits (JSON.parse's source text), beyond 2^53 too.
  const payload = JSON.parse(text, (key, value, context) =>
    key === "seed" && context && context.source ? context.source : value,
  );
  return payload.data.map((datum) =>
    makeItem(datum.b64_json, payload.output_format, String(datum.seed), request.prompt),
  );
}

function previewCard(event, request) {
  const figure = document.createElement("figure");
  figure.className = "card preview";
  const img = document.createElement("img");
  img.src = URL.createObjectURL(b64ToBlob(event.b64_json, `image/${event.output_format}`));
  img.alt = `preview ${event.partial_image_index + 1} of ${request.partials}`;
  img.addEventListener("load", () => img.classList.toggle("pixel", img.naturalWidth < 256));
  // Once loaded (or failed) the preview needs its URL no more, even while shown; revoked sooner, a preview
  // replaced before it loaded would fail to load.
  const release = () => URL.revokeObjectURL(img.src);
  img.addEventListener("load", release, { once: true });
  img.addEventListener("error", release, { once: true });
  const caption = document.createElement("figcaption");
  caption.textContent = img.alt;
  figure.append(img, caption);
  return figure;
}

// Shows each image's latest preview in its place, then the image itself; the result's items, in order.
async function streamedItems(response, request, started) {
  const items = [];
  const shown = [];
  let failure = null;
  const place = (index, card) => {
    if (!shown.length) {
      $("timing").tBodies[0].replaceChildren();
      showResult([]);
      $("result-images").classList.toggle("many", request.n > 1);
    }
    const old = shown[index];
    if (old) old.replaceWith(card);
    else $("result-images").append(card);
    shown[index] = card;
  };
  const onEvent = (name, data) => {
    if (failure) return;
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      failure = `The server sent a malformed ${name} event.`;
      return;
    }
    if (name === "error") {
      failure = envelopeText(event.error);
      return;
    }
    const index = event.image_index ?? 0;
    if (name.endsWith(".partial_image")) {
      request.firstPreviewMs ??= performance.now() - started;
      place(index, previewCard(event, request));
    } else if (name.endsWith(".completed")) {
      const seed = String(BigInt(request.seed) + BigInt(index));
      items[index] = makeItem(event.b64_json, event.output_format, seed, request.prompt);
      place(index, imageCard(items[index], { compact: false }));
    }
  };
  try {
    await readEventStream(response, onEvent);
    if (failure) throw new ServerError(failure);
    if (items.filter(Boolean).length !== request.n) {
      throw new ServerError("The stream ended before every image was complete.");
    }
  } catch (error) {
    // Cancelled or failed: the previews go, the images already complete stay.
    for (const card of shown) if (card && card.classList.contains("preview")) card.remove();
    keep(items.filter(Boolean));
    if (!$("result-images").children.length) {
      $("result").hidden = true;
      $("empty").hidden = false;
    }
    throw error;
  }
  return items;
}

function linkButton(text, title, className, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = className;
  button.textContent = text;
  button.title = title;
  button.addEventListener("click", onClick);
  return button;
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
  const reuse = linkButton("reuse", "put this seed in the form", "link", () => {
    $("seed").value = item.seed;
  });
  const edit = linkButton("edit this", "use this image as the picture to edit", "link edit-this", () => {
    setMode("edit");
    pickSource(item.blob, item.filename);
    $("edit-box").scrollIntoView({ block: "nearest" });
  });
  const download = document.createElement("a");
  download.href = item.url;
  download.download = item.filename;
  download.textContent = "download";
  caption.append(seed, reuse, edit, download);
  figure.append(img, caption);
  return figure;
}

function b64ToBlob(b64, type) {
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return new Blob([bytes], { type });
}

function showResult(items) {
  $("empty").hidden = true;
  $("result").hidden = false;
  $("result-images").classList.toggle("many", items.length > 1);
  $("result-images").replaceChildren(...items.map((item) => imageCard(item, { compact: false })));
}

// Every finished image joins the session's gallery.
function keep(items) {
  if (!items.length) return;
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
