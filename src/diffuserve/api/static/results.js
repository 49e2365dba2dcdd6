// diffuserve playground: the images of an answer (JSON, or a stream's previews then images) and their cards;
// history.js keeps them.
"use strict";

// One image of an answer as the page keeps it: its blob and URL, and its history entry (see newEntry).
function makeItem(b64, seed, request, index, answer) {
  const blob = b64ToBlob(b64, `image/${answer.output_format}`);
  return itemOf(newEntry(request.record, blob, seed, index, answer));
}

// An answer's JSON, its seeds kept as their exact digits (JSON.parse's source text), beyond 2^53 too.
function parseAnswer(text) {
  return JSON.parse(text, (key, value, context) =>
    key === "seed" && context && context.source ? context.source : value,
  );
}

// The items of a generation's or an edit's answer (a job's result is the same body).
function answerItems(payload, request) {
  const { model, size, quality, output_format } = payload;
  const answer = { model, size, quality, output_format };
  return payload.data.map((datum, i) => makeItem(datum.b64_json, String(datum.seed), request, i, answer));
}

function jsonItems(text, request) {
  return answerItems(parseAnswer(text), request);
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
      const answer = {
        model: request.record.fields.model,
        size: event.size,
        quality: event.quality,
        output_format: event.output_format,
      };
      items[index] = makeItem(event.b64_json, seed, request, index, answer);
      place(index, imageCard(items[index]));
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

// An image of the result panel.
function imageCard(item) {
  const figure = document.createElement("figure");
  figure.className = "card";
  const img = document.createElement("img");
  img.src = item.url;
  img.alt = `${item.prompt} (seed ${item.seed})`;
  img.addEventListener("load", () => img.classList.toggle("pixel", img.naturalWidth < 256));
  const caption = document.createElement("figcaption");
  const seed = document.createElement("span");
  seed.className = "seed-value";
  seed.textContent = `seed ${item.seed}`;
  const reuse = linkButton("reuse", "put this seed in the form", "link", () => {
    $("seed").value = item.seed;
  });
  caption.append(seed, reuse, editButton(item), downloadLink(item));
  figure.append(img, caption);
  return figure;
}

function editButton(item) {
  return linkButton("edit this", "use this image as the picture to edit", "link edit-this", () => {
    setMode("edit");
    pickSource(item.blob, item.filename);
    $("edit-box").scrollIntoView({ block: "nearest" });
  });
}

function downloadLink(item) {
  const link = document.createElement("a");
  link.href = item.url;
  link.download = item.filename;
  link.textContent = "download";
  return link;
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
  $("result-images").replaceChildren(...items.map(imageCard));
}
