// One job: status, options, metadata, the memory plan against the measured peak, live loss and memory charts,
// the events log (streamed), checkpoints, evaluations, exports (merged models to download), the adapter download,
// and Pause / Resume / Cancel.

import { api, downloadFile, listAll, streamEvents } from "../api.js";
import { lineChart } from "../chart.js";
import { badge, errorNotice, fill, h, kv } from "../dom.js";
import { bytes, dateTime, duration, number, optionValue } from "../format.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 3000;
const LOG_LINES = 400;
const PLAN_PARTS = ["weights", "adapters", "gradients", "optimizer", "activations", "overhead"];

/** Series that keep one value per step (a resumed attempt's value replaces the lost attempt's). */
class StepSeries {
  constructor() { this.index = new Map(); this.xs = []; this.ys = []; }
  add(x, y) {
    if (!Number.isFinite(x) || typeof y !== "number") return;
    const at = this.index.get(x);
    if (at !== undefined) { this.ys[at] = y; return; }
    if (this.xs.length && x < this.xs[this.xs.length - 1]) { this.insertSorted(x, y); return; }
    this.index.set(x, this.xs.length);
    this.xs.push(x);
    this.ys.push(y);
  }
  insertSorted(x, y) {
    const pairs = this.xs.map((v, i) => [v, this.ys[i]]);
    pairs.push([x, y]);
    pairs.sort((a, b) => a[0] - b[0]);
    this.xs = pairs.map((p) => p[0]);
    this.ys = pairs.map((p) => p[1]);
    this.index = new Map(this.xs.map((v, i) => [v, i]));
  }
}

export function renderJob(root, signal, jobId) {
  const state = { job: null, plan: null, eventCount: 0, telemetryAfter: 0, finalized: false };
  const train = new StepSeries();
  const valid = new StepSeries();
  const memory = { gpu: { xs: [], ys: [] }, torch: { xs: [], ys: [] }, rss: { xs: [], ys: [] } };
  let lastTelemetryStep = 0;

  const title = h("h1", { class: "mono", text: jobId });
  const statusSlot = h("span");
  const message = h("div", { "aria-live": "polite" });
  const pause = h("button", { type: "button", text: "Pause", disabled: true, onclick: () => act("pause") });
  const resume = h("button", { type: "button", text: "Resume", disabled: true, onclick: () => act("resume") });
  const cancel = h("button", { type: "button", class: "danger", text: "Cancel", disabled: true, onclick: () => act("cancel") });
  const download = h("button", { type: "button", class: "primary", text: "Download", hidden: true, onclick: () => downloadAdapter() });
  const tryIt = h("a", { class: "button", text: "Try in Playground", hidden: true });
  const errorSlot = h("div");
  const overview = h("div");
  const planSlot = h("div", null, h("p", { class: "muted small", text: "The plan appears once the worker validated the job." }));
  const optionsSlot = h("div");
  const metadataSlot = h("div");
  const checkpointsSlot = h("div", null, h("p", { class: "muted small", text: "None yet." }));
  const evaluationsSlot = h("div", null, h("p", { class: "muted small", text: "None." }));
  const exportsSlot = h("div", null, h("p", { class: "muted small", text: "None." }));
  const log = h("ol", { class: "log", "aria-label": "Events", "aria-live": "off" });
  const logInfo = h("p", { class: "muted small" });
  const progressBar = h("span");
  const progressText = h("span", { class: "small muted" });

  const lossChart = lineChart({ name: "Loss", yFormat: (v) => number(v, 3), emptyText: "No loss reported yet" });
  const memoryChart = lineChart({ name: "Memory", yFormat: bytes, emptyText: "No memory samples yet" });

  root.append(
    h("div", { class: "page-head" }, h("a", { href: "#/jobs", text: "← Jobs" })),
    h("div", { class: "page-head" }, title, statusSlot, h("span", { class: "spacer" }),
      h("div", { class: "actions" }, pause, resume, cancel, tryIt, download)),
    message, errorSlot,
    h("div", { class: "stack" },
      h("div", { class: "panel" }, h("div", { class: "progress", role: "progressbar", "aria-label": "Training progress", "aria-valuemin": 0, "aria-valuemax": 100 }, progressBar), progressText),
      h("div", { class: "grid" },
        h("section", { class: "panel" }, h("h2", { text: "Overview" }), overview),
        h("section", { class: "panel" }, h("h2", { text: "Memory plan" }), planSlot)),
      h("div", { class: "grid" },
        h("section", { class: "panel" }, lossChart.element),
        h("section", { class: "panel" }, memoryChart.element)),
      h("div", { class: "grid" },
        h("section", { class: "panel" }, h("h2", { text: "Checkpoints" }), checkpointsSlot),
        h("section", { class: "panel" }, h("h2", { text: "Evaluations" }), evaluationsSlot)),
      h("div", { class: "grid" },
        h("section", { class: "panel" }, h("h2", { text: "Hyperparameters and training options" }), optionsSlot),
        h("section", { class: "panel" }, h("h2", { text: "Metadata" }), metadataSlot)),
      h("section", { class: "panel" }, h("h2", { text: "Exports" }), exportsSlot),
      h("section", { class: "panel" }, h("h2", { text: "Events" }), logInfo, log)));

  async function act(action) {
    fill(message);
    try {
      showJob(await api(`/v1/fine_tuning/jobs/${jobId}/${action}`, { method: "POST", signal }));
    } catch (error) {
      if (!signal.aborted) fill(message, errorNotice(error.message));
    }
  }

  async function downloadAdapter() {
    const job = state.job;
    const name = `${(job.fine_tuned_model || job.id).replace(/[^\w.-]+/g, "_")}.zip`;
    try {
      await downloadFile(job.result_files[0], name);
    } catch (error) {
      fill(message, errorNotice(error.message));
    }
  }

  function showJob(job) {
    state.job = job;
    fill(statusSlot, badge(job.status));
    const live = !TERMINAL.has(job.status);
    pause.disabled = !(live && job.status !== "paused");
    resume.disabled = job.status !== "paused";
    cancel.disabled = !live;
    download.hidden = !(job.result_files && job.result_files.length);
    tryIt.hidden = !job.fine_tuned_model;
    if (job.fine_tuned_model) tryIt.href = `#/playground?model=${encodeURIComponent(job.fine_tuned_model)}`;
    fill(errorSlot, ...(job.error ? [errorNotice(`${job.error.code}: ${job.error.message}`)] : []));
    const step = job.progress?.step || 0;
    const total = job.progress?.total_steps;
    const fraction = job.status === "succeeded" ? 1 : total ? Math.min(1, step / total) : 0;
    progressBar.style.width = `${(fraction * 100).toFixed(1)}%`;
    progressBar.parentElement.setAttribute("aria-valuenow", String(Math.round(fraction * 100)));
    progressText.textContent = `${total ? `Step ${number(step)} of ${number(total)}` : step ? `Step ${number(step)}` : "Not started"}` +
      `${job.progress?.epoch != null ? ` · epoch ${number(job.progress.epoch, 3)}` : ""}` +
      `${job.estimated_finish && live ? ` · about ${duration(job.estimated_finish - Date.now() / 1000)} left` : ""}`;
    fill(overview, kv([
      ["Model", h("span", { class: "mono", text: job.model })],
      ["Fine-tuned model", job.fine_tuned_model ? h("span", { class: "mono", text: job.fine_tuned_model }) : "—"],
      ["Suffix", job.user_provided_suffix ?? "—"],
      ["Training file", h("span", { class: "mono", text: job.training_file })],
      ["Validation file", job.validation_file ? h("span", { class: "mono", text: job.validation_file }) : "—"],
      ["Created", dateTime(job.created_at)],
      ["Finished", dateTime(job.finished_at)],
      ["Trained tokens", number(job.trained_tokens)],
      ["Device", job.memory?.device ?? "—"],
      ["Attempt", String(job.attempt)],
      ["Seed", String(job.seed)],
    ]));
    const hyper = Object.entries(job.hyperparameters || {}).map(([k, v]) => [k, optionValue(v)]);
    const method = job.method?.type ? [["method", job.method.type]] : [];
    const training = Object.entries(job.training || {}).map(([k, v]) => [k, optionValue(v)]);
    fill(optionsSlot, h("h3", { text: "Hyperparameters" }), kv([...hyper, ...method]),
      h("h3", { text: "Training options (as resolved)" }), kv(training));
    const metadata = Object.entries(job.metadata || {});
    fill(metadataSlot, metadata.length ? kv(metadata) : h("p", { class: "muted small", text: "No metadata." }));
    showPlan();
  }

  function showPlan() {
    const job = state.job;
    const plan = state.plan;
    const peak = job?.memory?.peak_bytes;
    const estimate = plan?.estimate_bytes ?? job?.memory?.estimate_bytes;
    if (!estimate && !peak) return;
    const budget = plan?.budget_bytes ?? job?.memory?.budget_bytes;
    const scale = Math.max(estimate || 0, peak || 0, 1);
    const bar = (label, value, cls = "") => h("div", { class: "bar-row" }, h("span", { text: label }),
      (() => { const span = h("span"); span.style.width = `${Math.min(100, (100 * (value || 0)) / scale).toFixed(1)}%`; return h("div", { class: `bar ${cls}` }, span); })(),
      h("span", { class: "num small", text: bytes(value) }));
    const parts = plan?.breakdown ? PLAN_PARTS.filter((part) => part in plan.breakdown).map((part) => bar(part, plan.breakdown[part])) : [];
    const ratio = peak && estimate ? ` (measured ${((100 * peak) / estimate).toFixed(0)}% of the plan)` : "";
    fill(planSlot, 
      h("div", { class: "bars" }, ...parts, bar("planned peak", estimate), bar("measured peak", peak, "peak")),
      h("p", { class: "small muted", text: `Budget ${bytes(budget)} on ${plan?.device || job?.memory?.device || "the device"}${ratio}.` }),
      plan?.recommendation ? h("p", { class: "small", text: `Recommendation: ${plan.recommendation}` }) : null);
  }

  let drawTimer = null;
  function scheduleDraw() {
    if (drawTimer) return;
    drawTimer = setTimeout(() => {
      drawTimer = null;
      requestAnimationFrame(draw);
    }, 250);
  }
  function draw() {
    if (signal.aborted) return;
    lossChart.update([
      { label: "train loss", cls: "c1", xs: train.xs, ys: train.ys },
      { label: "validation loss", cls: "c2", xs: valid.xs, ys: valid.ys },
    ]);
    const job = state.job;
    memoryChart.update([
      { label: "GPU used", cls: "c4", xs: memory.gpu.xs, ys: memory.gpu.ys },
      { label: "torch allocated", cls: "c3", xs: memory.torch.xs, ys: memory.torch.ys },
      { label: "RSS", cls: "c5", xs: memory.rss.xs, ys: memory.rss.ys },
    ], [
      { label: "plan", cls: "c1", y: state.plan?.estimate_bytes ?? job?.memory?.estimate_bytes ?? NaN },
    ]);
  }

  function onEvents(batch) {
    const lines = [];
    const firstShown = batch.length - LOG_LINES;
    for (const [index, event] of batch.entries()) {
      state.eventCount += 1;
      const data = event.data || {};
      if (event.type === "metrics") {
        const step = Number(data.step);
        train.add(step, data.train_loss);  // a metrics event's valid_loss is one batch's: the curve is the whole file's
      } else if (data.plan && data.plan.breakdown) {
        state.plan = data.plan;
        showPlan();
      } else if (/checkpoint/i.test(event.message)) {
        loadCheckpoints();
      }
      if (index < firstShown) continue;  // only the latest lines are kept on the page
      lines.push(h("li", { class: event.level },
        h("time", { datetime: new Date(event.created_at * 1000).toISOString(), text: new Date(event.created_at * 1000).toLocaleTimeString() }),
        event.message));
    }
    log.append(...lines);
    while (log.childElementCount > LOG_LINES) log.firstElementChild.remove();
    logInfo.textContent = state.eventCount > LOG_LINES ? `The latest ${LOG_LINES} of ${number(state.eventCount)} events.` : `${number(state.eventCount)} events.`;
    const nearBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 60;
    if (nearBottom) log.scrollTop = log.scrollHeight;
    scheduleDraw();
  }

  async function loadTelemetry() {
    try {
      for (;;) {
        const page = await api(`/v1/fine_tuning/jobs/${jobId}/telemetry`, { query: { after: state.telemetryAfter, limit: 10000 }, signal });
        for (const row of page.data) {
          const sample = row.sample || {};
          const x = row.step ?? sample.step ?? lastTelemetryStep;
          lastTelemetryStep = x;
          if (Array.isArray(sample.gpus)) { memory.gpu.xs.push(x); memory.gpu.ys.push(sample.gpus.reduce((sum, gpu) => sum + (gpu.used_bytes || 0), 0)); }
          if (Array.isArray(sample.torch)) { memory.torch.xs.push(x); memory.torch.ys.push(sample.torch.reduce((sum, dev) => sum + (dev.allocated_bytes || 0), 0)); }
          if (typeof sample.rss_bytes === "number") { memory.rss.xs.push(x); memory.rss.ys.push(sample.rss_bytes); }
        }
        if (page.last_seq != null) state.telemetryAfter = page.last_seq;
        if (!page.has_more) break;
      }
      scheduleDraw();
    } catch (error) {
      if (!signal.aborted) fill(message, errorNotice(error.message));
    }
  }

  async function loadCheckpoints() {
    try {
      const checkpoints = await listAll(`/v1/fine_tuning/jobs/${jobId}/checkpoints`, { query: { limit: 100 }, signal });
      for (const checkpoint of checkpoints) {
        const metric = checkpoint.metrics?.full_valid_loss ?? checkpoint.metrics?.eval_loss;  // the whole validation file
        if (typeof metric === "number") valid.add(checkpoint.step_number, metric);
      }
      fill(checkpointsSlot, checkpoints.length ? h("table", null,
        h("thead", null, h("tr", null, h("th", { class: "num", text: "Step" }), h("th", { text: "Metrics" }), h("th", { text: "Model name" }))),
        h("tbody", null, checkpoints.map((checkpoint) => h("tr", null,
          h("td", { class: "num", text: String(checkpoint.step_number) }),
          h("td", { class: "small", text: Object.entries(checkpoint.metrics || {}).filter(([k]) => k !== "step").map(([k, v]) => `${k} ${number(v)}`).join(", ") || "—" }),
          h("td", { class: "mono small", text: checkpoint.fine_tuned_model_checkpoint }))))) : h("p", { class: "muted small", text: "None yet." }));
      scheduleDraw();
    } catch (error) {
      if (!signal.aborted) fill(message, errorNotice(error.message));
    }
  }

  async function loadEvaluations() {
    try {
      const page = await api(`/v1/fine_tuning/jobs/${jobId}/evaluations`, { query: { limit: 20 }, signal });
      if (!page.data.length) return;
      fill(evaluationsSlot, h("table", null,
        h("thead", null, h("tr", null, h("th", { text: "Evaluation" }), h("th", { text: "Status" }), h("th", { text: "pass@k" }))),
        h("tbody", null, page.data.map((evaluation) => h("tr", null,
          h("td", { class: "mono small", text: evaluation.id }), h("td", null, badge(evaluation.status)),
          h("td", { class: "small", text: evaluation.pass_at_k ? Object.entries(evaluation.pass_at_k).map(([k, v]) => `${k} ${(100 * v).toFixed(1)}%`).join(", ") : evaluation.error || "—" }))))));
    } catch (error) {
      if (!signal.aborted && error.status !== 404) fill(message, errorNotice(error.message));
    }
  }

  async function loadExports() {
    try {
      const page = await api(`/v1/fine_tuning/jobs/${jobId}/exports`, { query: { limit: 20 }, signal });
      if (!page.data.length) return;
      fill(exportsSlot, h("table", null,
        h("thead", null, h("tr", null, h("th", { text: "Export" }), h("th", { text: "Status" }), h("th", { text: "Merged model" }))),
        h("tbody", null, page.data.map((item) => h("tr", null,
          h("td", { class: "mono small", text: item.id }), h("td", null, badge(item.status)),
          h("td", { class: "small" }, item.file_id
            ? h("button", { type: "button", text: "Download merged model", onclick: () => downloadExport(item) })
            : item.error || "—"))))));
      if (page.data.some((item) => item.status === "queued" || item.status === "running")) setTimeout(loadExports, POLL_MS);
    } catch (error) {
      if (!signal.aborted && error.status !== 404) fill(message, errorNotice(error.message));
    }
  }

  async function downloadExport(item) {
    try {
      await downloadFile(item.file_id, `${jobId}-merged.zip`);
    } catch (error) {
      fill(message, errorNotice(error.message));
    }
  }

  async function poll() {
    if (signal.aborted) return;
    try {
      const job = await api(`/v1/fine_tuning/jobs/${jobId}`, { signal });
      const wasLive = state.job && !TERMINAL.has(state.job.status);
      showJob(job);
      if (document.visibilityState === "visible" || TERMINAL.has(job.status)) await loadTelemetry();
      if (TERMINAL.has(job.status)) {
        if (wasLive) await Promise.all([loadCheckpoints(), loadEvaluations()]);
        if (job.status === "succeeded" && !state.finalized) { state.finalized = true; setTimeout(loadEvaluations, 5000); }
        return;
      }
    } catch (error) {
      if (signal.aborted) return;
      fill(message, errorNotice(error.message));
      if (error.status === 404) return;
    }
    setTimeout(poll, POLL_MS);
  }

  (async () => {
    try {
      showJob(await api(`/v1/fine_tuning/jobs/${jobId}`, { signal }));
    } catch (error) {
      if (!signal.aborted) fill(root, h("div", { class: "page-head" }, h("a", { href: "#/jobs", text: "← Jobs" })), errorNotice(error.message));
      return;
    }
    streamEvents(jobId, { onEvents, signal, onError: (error) => fill(message, errorNotice(error.message)) });
    await Promise.all([loadTelemetry(), loadCheckpoints(), loadEvaluations(), loadExports()]);
    setTimeout(poll, TERMINAL.has(state.job.status) ? 0 : POLL_MS);
  })();
}
