// Jobs: newest first, live status, a status filter, keyset paging, the queue, and picking jobs to compare.

import { api } from "../api.js";
import { badge, errorNotice, field, fill, h } from "../dom.js";
import { ago, number } from "../format.js";

const PAGE_SIZE = 50;
const POLL_MS = 4000;
const STATUSES = ["", "queued", "validating_files", "running", "paused", "succeeded", "failed", "cancelled"];
const LIVE = new Set(["queued", "validating_files", "running", "paused"]);

export function renderJobs(root, signal, params) {
  const status = params.get("status") || "";
  const cursors = [];  // the `after` of each page shown before this one
  let after = params.get("after") || undefined;
  const selected = new Set();
  const rows = new Map();

  const filter = h("select", { onchange: () => { location.hash = filter.value ? `#/jobs?status=${filter.value}` : "#/jobs"; } },
    STATUSES.map((value) => h("option", { value, text: value ? value.replace("_", " ") : "all", selected: value === status })));
  const compareButton = h("button", { type: "button", disabled: true, text: "Compare selected",
    onclick: () => { location.hash = `#/compare?ids=${[...selected].join(",")}`; } });
  const tbody = h("tbody");
  const message = h("div", { "aria-live": "polite" });
  const newer = h("button", { type: "button", text: "Newer", disabled: true, onclick: () => { after = cursors.pop(); load(); } });
  const older = h("button", { type: "button", text: "Older", disabled: true, onclick: () => { cursors.push(after); after = older.dataset.next; load(); } });
  const pageInfo = h("span", { class: "muted small" });
  const queue = h("section", { class: "panel", "aria-labelledby": "queue-title" }, h("h2", { id: "queue-title", text: "Queue" }), h("p", { class: "muted small", text: "Loading…" }));

  root.append(
    h("div", { class: "page-head" }, h("h1", { text: "Jobs" }), h("span", { class: "spacer" }),
      field("Status", filter),
      compareButton, h("a", { class: "button primary", href: "#/new", text: "New job" })),
    h("div", { class: "stack" },
      queue,
      h("section", { class: "panel", "aria-label": "Jobs list" }, message,
        h("table", { class: "jobs-table" },
          h("thead", null, h("tr", null, h("th", { class: "col-check" }, h("span", { class: "sr-only", text: "Select" })),
            h("th", { class: "col-id", text: "Job" }), h("th", { class: "col-status", text: "Status" }),
            h("th", { class: "hide-narrow", text: "Model" }), h("th", { class: "hide-narrow", text: "Progress" }),
            h("th", { text: "Created" }))),
          tbody),
        h("div", { class: "pager" }, pageInfo, newer, older))));

  function row(job) {
    const check = h("input", { type: "checkbox", "aria-label": `Select ${job.id} to compare`, checked: selected.has(job.id),
      onchange: () => {
        if (check.checked) selected.add(job.id); else selected.delete(job.id);
        compareButton.disabled = selected.size < 2;
      } });
    const cells = { status: h("td"), progress: h("td", { class: "hide-narrow" }), created: h("td", { class: "small" }) };
    const name = job.user_provided_suffix ? h("div", { class: "small muted", text: job.user_provided_suffix }) : null;
    const tr = h("tr", { dataset: { job: job.id } },
      h("td", null, check),
      h("td", null, h("a", { href: `#/jobs/${job.id}`, class: "mono", text: job.id }), name),
      cells.status, h("td", { class: "hide-narrow mono", text: job.model }), cells.progress, cells.created);
    return { tr, cells };
  }

  function refreshRow(entry, job) {
    fill(entry.cells.status, badge(job.status));
    const step = job.progress?.step;
    const total = job.progress?.total_steps;
    entry.cells.progress.textContent = step ? `${number(step)}${total ? ` / ${number(total)}` : ""} steps` : "—";
    entry.cells.created.textContent = ago(job.created_at);
    entry.cells.created.title = new Date(job.created_at * 1000).toISOString();
  }

  async function load(quiet = false) {
    try {
      const page = await api("/v1/fine_tuning/jobs", { query: { limit: PAGE_SIZE, after, status: status || undefined }, signal });
      if (!quiet || page.data.some((job) => !rows.has(job.id)) || page.data.length !== rows.size) {
        rows.clear();
        fill(tbody, ...page.data.map((job) => {
          const entry = row(job);
          rows.set(job.id, entry);
          return entry.tr;
        }));
      }
      for (const job of page.data) refreshRow(rows.get(job.id), job);
      if (!page.data.length) fill(tbody, h("tr", null, h("td", { colspan: 6, class: "muted", text: status ? `No ${status} jobs.` : "No jobs yet. Start one with New job." })));
      older.disabled = !page.has_more;
      older.dataset.next = page.last_id || "";
      newer.disabled = cursors.length === 0;
      pageInfo.textContent = `Page ${cursors.length + 1}`;
      fill(message);
      return page.data.some((job) => LIVE.has(job.status));
    } catch (error) {
      if (!signal.aborted) fill(message, errorNotice(error.message));
      return true;
    }
  }

  async function loadQueue() {
    try {
      const view = await api("/v1/fine_tuning/queue", { signal });
      const running = view.running.map((entry) => h("li", null, badge(entry.status),
        h("a", { href: `#/jobs/${entry.id}`, class: "mono", text: entry.id }),
        h("span", { class: "muted", text: `on ${entry.worker || "a worker"}${entry.device ? ` · ${entry.device}` : ""}` }),
        entry.progress?.step ? h("span", { class: "muted", text: `step ${entry.progress.step}${entry.progress.total_steps ? ` / ${entry.progress.total_steps}` : ""}` }) : null));
      const queued = view.queued.map((entry) => h("li", null, h("span", { class: "badge queued", text: `#${entry.position}` }),
        h("a", { href: `#/jobs/${entry.id}`, class: "mono", text: entry.id }), h("span", { class: "muted", text: `${entry.model} · queued ${ago(entry.created_at)}` })));
      fill(queue, h("h2", { id: "queue-title", text: "Queue" }),
        h("div", { class: "grid" },
          h("div", null, h("h3", { text: `Running (${running.length})` }), running.length ? h("ul", { class: "queue-list" }, running) : h("p", { class: "muted small", text: "Nothing of this project is running." })),
          h("div", null, h("h3", { text: `Waiting (${view.queued.length} of ${view.queued_total} in the queue)` }), queued.length ? h("ol", { class: "queue-list", "aria-label": "Queued jobs in order" }, queued) : h("p", { class: "muted small", text: "No job of this project is waiting." }))));
      return running.length + queued.length > 0;
    } catch (error) {
      if (!signal.aborted) fill(queue, h("h2", { id: "queue-title", text: "Queue" }), errorNotice(error.message));
      return false;
    }
  }

  // Poll while something is live, only when the tab is visible; a quiet page stays quiet.
  async function tick() {
    if (signal.aborted) return;
    let live = true;
    if (document.visibilityState === "visible") {
      const [listLive, queueLive] = await Promise.all([load(true), loadQueue()]);
      live = listLive || queueLive;
    }
    if (!signal.aborted) setTimeout(tick, live ? POLL_MS : POLL_MS * 4);
  }
  Promise.all([load(), loadQueue()]).then(() => setTimeout(tick, POLL_MS));
}
