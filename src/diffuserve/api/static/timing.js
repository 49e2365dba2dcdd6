// diffuserve playground: the timing table, from the browser's round trip and the answer's timing headers.
"use strict";

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

// A streamed answer has no timing headers (they leave before the images exist): the browser's times remain.
function timingRows(response, roundTripMs, firstPreviewMs) {
  const rows = [{ label: "round trip (browser)", ms: roundTripMs, group: "browser" }];
  if (firstPreviewMs != null) rows.push({ label: "first preview (browser)", ms: firstPreviewMs, group: "browser" });
  for (const name of ["x-queue-ms", "x-inference-ms"]) {
    const value = response.headers.get(name);
    if (value !== null) rows.push({ label: name, ms: Number(value), group: "header" });
  }
  for (const metric of parseServerTiming(response.headers.get("server-timing"))) {
    rows.push({ label: metric.name, ms: metric.dur, desc: metric.desc, group: "server-timing" });
  }
  return rows;
}

const INFO_HEADERS = ["x-batch-size", "x-model", "x-request-id"];

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
  for (const name of INFO_HEADERS) {
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

// The timing as the history keeps it: each row's milliseconds by its label, then the answer's info headers.
function timingRecord(rows, response) {
  const record = {};
  for (const row of rows) {
    record[row.group === "server-timing" ? `server-timing: ${row.label}` : row.label] = row.ms;
  }
  for (const name of INFO_HEADERS) {
    const value = response.headers.get(name);
    if (value !== null) record[name] = value;
  }
  return record;
}
