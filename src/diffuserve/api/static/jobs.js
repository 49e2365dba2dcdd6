// diffuserve playground: the form sent as a job (POST /v1/images/jobs), each job of this page polled until it
// ends and shown with its status; a job's images join the gallery and the history like any other result.
"use strict";

const JOB_POLL_MS = 400;
const JOB_RETRY_MS = 2000; // after a poll that failed: the server unreachable, or a key refused
const JOB_FINAL = ["succeeded", "failed", "cancelled", "gone"];
// list: this page's jobs, newest first; each { id, prompt, n, seed, record, started, view, row, timer … }.
const jobs = { list: [], submitting: false };

function jobUrl(job) {
  return `v1/images/jobs/${encodeURIComponent(job.id)}`;
}

function dataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// The job's body: the generation's JSON (never streamed: a job is polled), or an edit's with its picture and
// mask as data URLs, and the priority picked. The history keeps it as the synchronous route's body.
async function buildJob() {
  const { fields, seed } = formFields();
  const { stream, partial_images, ...body } = fields;
  const record = newRecord(body, seed);
  body.priority = $("priority").value;
  if (state.mode === "edit") {
    const picture = await editPicture(record);
    body.operation = "edits";
    body.images = [{ image_url: await dataUrl(picture.source) }];
    if (picture.mask) body.mask = { image_url: await dataUrl(picture.mask) };
  }
  return { prompt: body.prompt, n: body.n, seed, record, body: jsonWithSeed(body, seed) };
}

// One submission at a time: a double click sends one job.
async function submitJob() {
  if (jobs.submitting) return;
  jobs.submitting = true;
  $("submit-job").disabled = true;
  $("error").hidden = true;
  let job;
  let text;
  try {
    job = await buildJob();
    job.started = performance.now();
    const response = await fetch("v1/images/jobs", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json", Accept: "application/json" }),
      body: job.body,
    });
    text = await response.text();
    if (!response.ok) throw httpError(response, text);
  } catch (error) {
    if (error instanceof FormError) {
      showError(error.message);
      $(error.field).focus();
    } else {
      const reason = error instanceof ServerError ? "" : "The server could not be reached: ";
      showError(`The job was not submitted. ${reason}${error.message}`);
    }
    return;
  } finally {
    jobs.submitting = false;
    $("submit-job").disabled = false;
  }
  const view = parseAnswer(text);
  job.id = view.id;
  job.row = jobRow(job);
  jobs.list.unshift(job);
  $("jobs").prepend(job.row);
  jobSeen(job, view, text);
}

// What a poll (or the submission, or a cancel) told of the job; polls again until it has ended.
function jobSeen(job, view, text) {
  if (job.view && JOB_FINAL.includes(job.view.status)) return; // a poll sent before it ended
  window.clearTimeout(job.timer);
  job.view = view;
  job.note = "";
  if (view.status === "succeeded") jobDone(job, text);
  renderJob(job);
  showJobs();
  if (!JOB_FINAL.includes(view.status)) job.timer = window.setTimeout(() => pollJob(job), JOB_POLL_MS);
}

async function pollJob(job) {
  let response;
  let text;
  try {
    response = await fetch(jobUrl(job), { headers: authHeaders({ Accept: "application/json" }) });
    text = await response.text();
  } catch (error) {
    return jobTrouble(job, `the server could not be reached (${error.message}); trying again`);
  }
  if (response.status === 404) {
    // Expired, or lost with a server that keeps its jobs in memory and restarted.
    const error = { message: httpError(response, text).message };
    return jobSeen(job, { ...job.view, status: "gone", error }, null);
  }
  if (!response.ok) return jobTrouble(job, `${httpError(response, text).message}; trying again`);
  jobSeen(job, parseAnswer(text), text);
}

function jobTrouble(job, note) {
  if (job.view && JOB_FINAL.includes(job.view.status)) return;
  window.clearTimeout(job.timer);
  job.note = note;
  renderJob(job);
  job.timer = window.setTimeout(() => pollJob(job), JOB_RETRY_MS);
}

// Its images, with the timing the job's times give; the gallery and the history keep them.
function jobDone(job, text) {
  const { result, created_at, started_at, finished_at } = parseAnswer(text);
  job.items = answerItems(result, job);
  const timing = {
    "round trip (browser)": performance.now() - job.started,
    "job queued (server)": 1000 * (started_at - created_at),
    "job ran (server)": 1000 * (finished_at - started_at),
    "job id": job.id,
    "x-model": result.model,
  };
  for (const item of job.items) item.entry.timing = timing;
  job.thumbs = job.items.map((item) => URL.createObjectURL(item.blob));
  state.lastSeed = job.items[0].seed;
  $("seed-reuse").disabled = false;
  keep(job.items);
}

async function cancelJob(job) {
  job.cancelling = true;
  renderJob(job);
  let response;
  let text;
  try {
    const headers = authHeaders({ Accept: "application/json" });
    response = await fetch(jobUrl(job), { method: "DELETE", headers });
    text = await response.text();
  } catch (error) {
    job.cancelling = false;
    return jobTrouble(job, `not cancelled: ${error.message}`);
  }
  job.cancelling = false;
  if (response.ok) return jobSeen(job, parseAnswer(text), text);
  // 409: it ended meanwhile, and the next poll tells how.
  if (response.status !== 409) job.note = `not cancelled: ${httpError(response, text).message}`;
  renderJob(job);
}

// The job's images in the result panel, with its times.
function showJob(job) {
  showResult(job.items);
  const timing = job.items[0].entry.timing;
  const rows = ["round trip (browser)", "job queued (server)", "job ran (server)"].map((label) => ({
    label,
    ms: timing[label],
    group: label.endsWith("(browser)") ? "browser" : "header",
  }));
  renderTiming(rows, { headers: new Headers({ "x-model": timing["x-model"] }) });
  $("result").scrollIntoView({ block: "nearest" });
}

function jobRow(job) {
  const row = document.createElement("li");
  row.className = "job";
  row.dataset.id = job.id;
  const head = document.createElement("div");
  head.className = "job-head";
  const prompt = document.createElement("span");
  prompt.className = "job-prompt";
  prompt.textContent = job.prompt;
  const status = document.createElement("span");
  status.className = "job-status";
  const cancel = linkButton("cancel", "cancel this job", "link job-cancel", () => cancelJob(job));
  head.append(prompt, status, cancel);
  const bar = document.createElement("progress");
  const meta = document.createElement("p");
  meta.className = "job-meta";
  const note = document.createElement("p");
  note.className = "job-note";
  const images = document.createElement("div");
  images.className = "job-images";
  row.append(head, bar, meta, note, images);
  return row;
}

function jobStatusText(view) {
  switch (view.status) {
    case "queued":
      return view.queue_position ? `queued, ${view.queue_position} ahead` : "queued, next";
    case "running":
      return view.progress ? `running, step ${view.progress.step}/${view.progress.steps}` : "running";
    case "succeeded":
      return `succeeded in ${(view.finished_at - view.created_at).toFixed(1)} s`;
    case "gone":
      return "gone";
    default:
      return view.status;
  }
}

function renderJob(job) {
  const { row, view } = job;
  row.dataset.status = view.status;
  row.querySelector(".job-status").textContent = jobStatusText(view);
  const cancel = row.querySelector(".job-cancel");
  cancel.hidden = JOB_FINAL.includes(view.status);
  cancel.disabled = Boolean(job.cancelling);
  cancel.textContent = job.cancelling ? "cancelling…" : "cancel";
  const bar = row.querySelector("progress");
  bar.hidden = view.status !== "running" && view.status !== "queued";
  if (view.status === "running" && view.progress) {
    bar.max = view.progress.steps;
    bar.value = view.progress.step;
  } else {
    bar.removeAttribute("value"); // queued: an indeterminate bar
  }
  const images = `${job.n} image${job.n > 1 ? "s" : ""}`;
  row.querySelector(".job-meta").textContent = [job.id, view.priority, view.operation, images].join(" · ");
  const error = view.error ? envelopeText(view.error) : "";
  const note = row.querySelector(".job-note");
  note.textContent = error || job.note || "";
  note.className = error ? "job-note error" : "job-note";
  note.hidden = !note.textContent;
  const box = row.querySelector(".job-images");
  if (job.thumbs && !box.children.length) {
    const show = linkButton("", "show this job's images in the result panel", "job-show", () => showJob(job));
    show.append(
      ...job.thumbs.map((url, i) => {
        const img = document.createElement("img");
        img.src = url;
        img.alt = `${job.prompt} (seed ${job.items[i].seed})`;
        img.addEventListener("load", () => img.classList.toggle("pixel", img.naturalWidth < 48));
        return img;
      }),
    );
    box.append(show);
  }
}

function showJobs() {
  $("jobs-box").hidden = jobs.list.length === 0;
  const running = jobs.list.filter((job) => !JOB_FINAL.includes(job.view?.status)).length;
  $("jobs-count").textContent = `(${jobs.list.length}${running ? `, ${running} unfinished` : ""})`;
}

// Finished jobs leave the list; their images stay in the gallery.
function clearJobs() {
  for (const job of jobs.list.filter((one) => JOB_FINAL.includes(one.view.status))) {
    job.row.remove();
    for (const url of job.thumbs || []) URL.revokeObjectURL(url);
  }
  jobs.list = jobs.list.filter((job) => !JOB_FINAL.includes(job.view.status));
  showJobs();
}

function initJobs() {
  $("submit-job").addEventListener("click", submitJob);
  $("clear-jobs").addEventListener("click", clearJobs);
}
