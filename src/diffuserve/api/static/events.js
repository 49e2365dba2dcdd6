// diffuserve playground: reads a text/event-stream answer from fetch, since EventSource can only GET.
"use strict";

// One line at a time, as the server-sent events format defines it: a blank line ends an event; an event
// with no data line is dropped.
function eventLineReader(onEvent) {
  let name = "";
  let data = [];
  return (line) => {
    if (line === "") {
      if (data.length) onEvent(name || "message", data.join("\n"));
      name = "";
      data = [];
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  };
}

// Calls onEvent(name, data) for each event of the response's body as its bytes arrive; an event cut off by
// the end of the body is dropped. A lone \r at the end of a chunk waits for the next one, which may begin
// with the \n of the same line break.
async function readEventStream(response, onEvent) {
  const feed = eventLineReader(onEvent);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pending += value;
    const lines = pending.split(/\r\n|\r(?!$)|\n/);
    pending = lines.pop();
    lines.forEach(feed);
  }
}
