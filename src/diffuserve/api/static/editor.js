// diffuserve playground: the edit mode's source picture and the mask painted over it with a round brush.
"use strict";

// What the server reads; other pictures the browser can show (GIF, BMP, AVIF …) are sent as PNG.
const PICTURE_TYPES = ["image/png", "image/jpeg", "image/webp"];
const MASK_TINT = [230, 40, 90, 150]; // the overlay where the model repaints; only shown, never sent
const MAX_SHOWN_HEIGHT = 420; // CSS px: a tall picture stays beside the rest of the form
// painted: one byte per pixel of the picture, 1 where the model repaints. hooks: set by initEditor.
const editor = { blob: null, name: "", width: 0, height: 0, painted: null, last: null, frame: 0, hooks: {} };

function canvasBlob(canvas) {
  return new Promise((resolve, reject) => {
    canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("the browser could not make a PNG"))));
  });
}

// Shows the picture with an empty mask; its own bytes are what the edit sends.
async function loadSource(blob, name) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob);
  } catch {
    throw new Error(`${name || "This file"} is not a picture this browser can read.`);
  }
  const source = $("source-canvas");
  const mask = $("mask-canvas");
  const { width, height } = bitmap;
  source.width = mask.width = width;
  source.height = mask.height = height;
  source.getContext("2d").drawImage(bitmap, 0, 0);
  bitmap.close();
  if (!PICTURE_TYPES.includes(blob.type)) {
    blob = await canvasBlob(source);
    name = (name || "picture").replace(/\.[^.]*$/, "") + ".png";
  }
  Object.assign(editor, { blob, name: name || "picture.png", width, height, last: null });
  editor.painted = new Uint8Array(width * height);
  const longest = Math.max(width, height);
  $("brush").max = Math.max(2, Math.round(longest / 2));
  $("brush").value = Math.max(1, Math.round(longest / 8));
  showBrushSize();
  const stack = $("canvas-stack");
  stack.classList.toggle("pixel", longest < 256);
  stack.style.width = `min(100%, ${Math.round((MAX_SHOWN_HEIGHT * width) / height)}px)`;
  $("source-info").textContent = `${width}×${height}. Paint what to repaint; with no mask the whole picture is redrawn.`;
  $("editor").hidden = false;
  $("drop-zone").hidden = true;
  renderMask();
  editor.hooks.changed();
}

async function pickSource(blob, name) {
  try {
    await loadSource(blob, name);
  } catch (error) {
    editor.hooks.error(error.message);
    return;
  }
  editor.hooks.loaded();
}

// Paints back a mask the page sent before (transparent where painted), over the picture it was made for.
async function restoreMask(blob) {
  const bitmap = await createImageBitmap(blob);
  const { width, height, painted } = editor;
  if (bitmap.width !== width || bitmap.height !== height) {
    bitmap.close();
    throw new Error(`The kept mask is ${bitmap.width}×${bitmap.height}, the picture ${width}×${height}.`);
  }
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  bitmap.close();
  const alpha = context.getImageData(0, 0, width, height).data;
  for (let i = 0; i < painted.length; i++) painted[i] = alpha[i * 4 + 3] < 128 ? 1 : 0;
  renderMask();
  editor.hooks.changed();
}

function hasMask() {
  return editor.painted !== null && editor.painted.includes(1);
}

// OpenAI's mask: the picture's size, fully transparent (alpha 0) where the model repaints, opaque elsewhere.
// None when nothing is painted: the edit is then image-to-image.
async function maskBlob() {
  if (!hasMask()) return null;
  const { width, height, painted } = editor;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const image = new ImageData(width, height);
  for (let i = 0; i < painted.length; i++) {
    if (!painted[i]) image.data.fill(255, i * 4, i * 4 + 4);
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
  return canvasBlob(canvas);
}

function showBrushSize() {
  $("brush-value").textContent = `${$("brush").value} px`;
}

function renderMask() {
  editor.frame = 0;
  const { width, height, painted } = editor;
  const image = new ImageData(width, height);
  for (let i = 0; i < painted.length; i++) if (painted[i]) image.data.set(MASK_TINT, i * 4);
  $("mask-canvas").getContext("2d").putImageData(image, 0, 0);
}

function scheduleRender() {
  if (!editor.frame) editor.frame = requestAnimationFrame(renderMask);
}

function picturePoint(event) {
  const rect = $("mask-canvas").getBoundingClientRect();
  return {
    x: ((event.clientX - rect.left) * editor.width) / rect.width,
    y: ((event.clientY - rect.top) * editor.height) / rect.height,
  };
}

// Every pixel whose centre lies within the brush, and the pixel under its centre (so a 1 px brush paints).
function dab(cx, cy, radius) {
  const { width, height, painted } = editor;
  const top = Math.max(0, Math.floor(cy - radius));
  const bottom = Math.min(height - 1, Math.ceil(cy + radius));
  const left = Math.max(0, Math.floor(cx - radius));
  const right = Math.min(width - 1, Math.ceil(cx + radius));
  for (let y = top; y <= bottom; y++) {
    for (let x = left; x <= right; x++) {
      const dx = x + 0.5 - cx;
      const dy = y + 0.5 - cy;
      if (dx * dx + dy * dy <= radius * radius) painted[y * width + x] = 1;
    }
  }
  const x = Math.floor(cx);
  const y = Math.floor(cy);
  if (x >= 0 && x < width && y >= 0 && y < height) painted[y * width + x] = 1;
}

// Dabs close enough together that a stroke is a solid band however fast the pointer moved.
function paintTo(point) {
  const radius = Number($("brush").value) / 2;
  const from = editor.last || point;
  const distance = Math.hypot(point.x - from.x, point.y - from.y);
  const steps = Math.max(1, Math.ceil(distance / Math.max(0.5, radius / 4)));
  for (let i = 1; i <= steps; i++) {
    const t = i / steps;
    dab(from.x + (point.x - from.x) * t, from.y + (point.y - from.y) * t, radius);
  }
  editor.last = point;
  scheduleRender();
}

function carriesPicture(transfer) {
  return Array.from(transfer.types).some((type) => type === "Files" || type === "text/uri-list");
}

// A file dropped anywhere on the page, or an image dragged from the page itself (a blob: URL it made).
async function dropped(transfer) {
  const file = transfer.files[0];
  if (file) return pickSource(file, file.name);
  const item = editor.hooks.itemForUrl(transfer.getData("text/uri-list").trim());
  if (item) return pickSource(item.blob, item.filename);
  editor.hooks.error("Drop a picture file, or an image of this page.");
}

// hooks: changed() after the picture or its mask changed, loaded() once a picked picture shows, error(message),
// itemForUrl(url) → {blob, filename} of an image the page made, or undefined.
function initEditor(hooks) {
  editor.hooks = hooks;
  const mask = $("mask-canvas");
  mask.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    mask.setPointerCapture(event.pointerId);
    editor.last = null;
    paintTo(picturePoint(event));
  });
  mask.addEventListener("pointermove", (event) => {
    if (mask.hasPointerCapture(event.pointerId)) paintTo(picturePoint(event));
  });
  const end = () => {
    if (editor.last === null) return;
    editor.last = null;
    hooks.changed();
  };
  mask.addEventListener("pointerup", end);
  mask.addEventListener("pointercancel", end);
  $("brush").addEventListener("input", showBrushSize);
  $("mask-clear").addEventListener("click", () => {
    editor.painted.fill(0);
    scheduleRender();
    hooks.changed();
  });
  $("source-change").addEventListener("click", () => $("source-file").click());
  $("source-file").addEventListener("change", () => {
    const file = $("source-file").files[0];
    $("source-file").value = "";
    if (file) pickSource(file, file.name);
  });
  document.addEventListener("dragover", (event) => {
    if (!carriesPicture(event.dataTransfer)) return;
    event.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    document.body.classList.remove("dragging");
    if (!carriesPicture(event.dataTransfer)) return;
    event.preventDefault();
    dropped(event.dataTransfer);
  });
}
