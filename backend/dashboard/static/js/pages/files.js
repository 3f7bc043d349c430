// Files: the project's uploads and result files, with size, format and examples, and delete.

import { api } from "../api.js";
import { errorNotice, fill, h } from "../dom.js";
import { ago, bytes, number } from "../format.js";

const PAGE_SIZE = 50;

export function renderFiles(root, signal) {
  const cursors = [];
  let after;
  const message = h("div", { "aria-live": "polite" });
  const tbody = h("tbody");
  const newer = h("button", { type: "button", text: "Newer", disabled: true, onclick: () => { after = cursors.pop(); load(); } });
  const older = h("button", { type: "button", text: "Older", disabled: true, onclick: () => { cursors.push(after); after = older.dataset.next; load(); } });
  root.append(h("div", { class: "page-head" }, h("h1", { text: "Files" }), h("span", { class: "spacer" }), h("a", { class: "button", href: "#/new", text: "Upload in New job" })),
    message,
    h("section", { class: "panel" }, h("table", null,
      h("thead", null, h("tr", null, h("th", { text: "File" }), h("th", { class: "hide-narrow", text: "Purpose" }), h("th", { class: "num", text: "Size" }),
        h("th", { class: "hide-narrow", text: "Format" }), h("th", { class: "num hide-narrow", text: "Examples" }), h("th", { class: "hide-narrow", text: "Created" }), h("th", { text: "" }))),
      tbody), h("div", { class: "pager" }, newer, older)));

  async function remove(file, button) {
    if (!confirm(`Delete ${file.filename}?`)) return;
    button.disabled = true;
    try {
      await api(`/v1/files/${file.id}`, { method: "DELETE", signal });
      load();
    } catch (error) {
      button.disabled = false;
      fill(message, errorNotice(`${file.filename}: ${error.message}`));
    }
  }

  async function load() {
    try {
      const page = await api("/v1/files", { query: { limit: PAGE_SIZE, after }, signal });
      fill(tbody, ...page.data.map((file) => {
        const del = h("button", { type: "button", class: "danger", text: "Delete", "aria-label": `Delete ${file.filename}` });
        del.addEventListener("click", () => remove(file, del));
        return h("tr", { dataset: { file: file.id } },
          h("td", null, h("div", { text: file.filename }), h("div", { class: "mono small muted", text: file.id })),
          h("td", { class: "hide-narrow", text: file.purpose }), h("td", { class: "num", text: bytes(file.bytes) }),
          h("td", { class: "hide-narrow", text: file.format ?? "—" }), h("td", { class: "num hide-narrow", text: number(file.n_examples) }),
          h("td", { class: "hide-narrow small", text: ago(file.created_at) }), h("td", null, del));
      }));
      if (!page.data.length) fill(tbody, h("tr", null, h("td", { colspan: 7, class: "muted", text: "No files yet." })));
      older.disabled = !page.has_more;
      older.dataset.next = page.last_id || "";
      newer.disabled = cursors.length === 0;
    } catch (error) {
      if (!signal.aborted) fill(message, errorNotice(error.message));
    }
  }
  load();
}
