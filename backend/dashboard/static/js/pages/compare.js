// Compare: two or more jobs' loss curves overlaid (by step or by epoch) and a diff of their options.

import { api, streamEvents } from "../api.js";
import { lineChart } from "../chart.js";
import { badge, checkbox, errorNotice, field, fill, h } from "../dom.js";
import { ago, number, optionValue } from "../format.js";

const MAX_JOBS = 4;  // each live job holds a stream open, and a browser has 6 connections per server

export function renderCompare(root, signal, params) {
  const ids = (params.get("ids") || "").split(",").filter(Boolean).slice(0, MAX_JOBS);
  root.append(h("div", { class: "page-head" }, h("h1", { text: "Compare jobs" })));
  if (ids.length < 2) {
    renderPicker(root, signal, ids);
    return;
  }
  const message = h("div", { "aria-live": "polite" });
  const axis = h("select", { name: "x-axis" }, h("option", { value: "step", text: "step" }), h("option", { value: "epoch", text: "epoch" }),
    h("option", { value: "tokens", text: "tokens" }));
  const onlyDiff = h("input", { type: "checkbox", checked: true });
  const chart = lineChart({ name: "Loss", xLabel: "step", yFormat: (v) => number(v, 3), emptyText: "Loading the curves…" });
  const diffSlot = h("div");
  const jobs = ids.map((id) => ({ id, job: null, steps: [], epochs: [], losses: [] }));
  root.append(message,
    h("div", { class: "stack" },
      h("section", { class: "panel" }, h("div", { class: "page-head" }, h("span", { class: "spacer" }), field("X axis", axis, "Tokens: a job's trained tokens spread evenly over its steps.")), chart.element),
      h("section", { class: "panel" }, h("div", { class: "page-head" }, h("h2", { text: "Options" }), h("span", { class: "spacer" }),
        checkbox("Only differences", onlyDiff)), diffSlot),
      h("p", null, h("a", { href: "#/compare", text: "Pick other jobs" }))));

  let timer = null;
  const draw = () => {
    timer = null;
    chart.update(jobs.map((entry, index) => ({
      label: entry.job?.user_provided_suffix ? `${entry.id} (${entry.job.user_provided_suffix})` : entry.id,
      cls: `c${(index % 6) + 1}`,
      xs: xsOf(entry),
      ys: entry.losses,
    })), [], axis.value);
  };
  // Tokens: a job's trained tokens over its steps (known once it ran); a run without them is left out.
  const xsOf = (entry) => {
    if (axis.value === "epoch") return entry.epochs;
    if (axis.value === "step") return entry.steps;
    const steps = entry.job?.progress?.total_steps || entry.steps[entry.steps.length - 1];
    const tokens = entry.job?.trained_tokens;
    return tokens && steps ? entry.steps.map((step) => Math.round((step * tokens) / steps)) : [];
  };
  const schedule = () => { timer ||= setTimeout(() => requestAnimationFrame(draw), 200); };
  axis.addEventListener("change", draw);
  onlyDiff.addEventListener("change", () => showDiff());

  function showDiff() {
    const loaded = jobs.filter((entry) => entry.job);
    const rows = new Map();
    const put = (key, index, value) => {
      if (!rows.has(key)) rows.set(key, new Array(jobs.length).fill("—"));
      rows.get(key)[index] = optionValue(value);
    };
    jobs.forEach((entry, index) => {
      const job = entry.job;
      if (!job) return;
      put("status", index, job.status);
      put("model", index, job.model);
      put("training_file", index, job.training_file);
      put("validation_file", index, job.validation_file);
      for (const [key, value] of Object.entries(job.hyperparameters || {})) put(`hyperparameters.${key}`, index, value);
      for (const [key, value] of Object.entries(job.training || {})) put(`training.${key}`, index, value);
      for (const [key, value] of Object.entries(job.metadata || {})) put(`metadata.${key}`, index, value);
      put("trained_tokens", index, job.trained_tokens);
      const last = entry.losses.length ? entry.losses[entry.losses.length - 1] : null;
      put("final train loss", index, last === null ? null : Number(last.toPrecision(5)));
    });
    const body = [];
    for (const [key, values] of rows) {
      const differs = new Set(values).size > 1;
      if (onlyDiff.checked && !differs && key !== "status") continue;
      body.push(h("tr", { class: differs ? "diff-row" : "" }, h("th", { scope: "row", class: "mono", text: key }), values.map((value) => h("td", { class: "mono small", text: value }))));
    }
    fill(diffSlot, loaded.length ? h("table", { "aria-label": "Options of the compared jobs" },
      h("thead", null, h("tr", null, h("th", { text: "option" }), jobs.map((entry) => h("th", null, h("a", { href: `#/jobs/${entry.id}`, class: "mono", text: entry.id }))))),
      h("tbody", null, body)) : h("p", { class: "muted", text: "Loading…" }));
  }

  for (const entry of jobs) {
    api(`/v1/fine_tuning/jobs/${entry.id}`, { signal }).then((job) => {
      entry.job = job;
      showDiff();
      const seen = new Map();
      streamEvents(entry.id, {
        signal,
        onEvents(batch) {
          for (const event of batch) {
            if (event.type !== "metrics" || typeof event.data?.train_loss !== "number") continue;
            const step = Number(event.data.step);
            const at = seen.get(step);
            if (at !== undefined) { entry.losses[at] = event.data.train_loss; continue; }
            seen.set(step, entry.steps.length);
            entry.steps.push(step);
            entry.epochs.push(Number(event.data.epoch ?? NaN));
            entry.losses.push(event.data.train_loss);
          }
          schedule();
          showDiff();
        },
        onError: (error) => message.append(errorNotice(`${entry.id}: ${error.message}`)),
      });
    }).catch((error) => { if (!signal.aborted) message.append(errorNotice(`${entry.id}: ${error.message}`)); });
  }
}

function renderPicker(root, signal, preselected) {
  const chosen = new Set(preselected);
  const go = h("button", { type: "button", class: "primary", text: "Compare", disabled: chosen.size < 2,
    onclick: () => { location.hash = `#/compare?ids=${[...chosen].join(",")}`; } });
  const list = h("tbody", null, h("tr", null, h("td", { colspan: 4, class: "muted", text: "Loading…" })));
  root.append(h("section", { class: "panel" }, h("p", { class: "muted", text: `Pick two to ${MAX_JOBS} jobs.` }),
    h("table", null, h("thead", null, h("tr", null, h("th", { class: "col-check" }, h("span", { class: "sr-only", text: "Select" })), h("th", { text: "Job" }), h("th", { text: "Status" }), h("th", { text: "Created" }))), list),
    h("div", { class: "pager" }, go)));
  api("/v1/fine_tuning/jobs", { query: { limit: 50 }, signal }).then((page) => {
    fill(list, ...page.data.map((job) => {
      const box = h("input", { type: "checkbox", "aria-label": `Select ${job.id} to compare`, checked: chosen.has(job.id),
        onchange: () => {
          if (box.checked) chosen.add(job.id); else chosen.delete(job.id);
          go.disabled = chosen.size < 2 || chosen.size > MAX_JOBS;
        } });
      return h("tr", null, h("td", null, box), h("td", null, h("span", { class: "mono", text: job.id }),
        job.user_provided_suffix ? h("div", { class: "small muted", text: job.user_provided_suffix }) : null),
        h("td", null, badge(job.status)), h("td", { class: "small", text: ago(job.created_at) }));
    }));
  }).catch((error) => { if (!signal.aborted) fill(list, h("tr", null, h("td", { colspan: 4 }, errorNotice(error.message)))); });
}
