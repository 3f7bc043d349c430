// Playground: one prompt to a fine-tuned model and to its base, side by side, both answers streamed.

import { api, streamCompletion } from "../api.js";
import { errorNotice, field, fill, h } from "../dom.js";

function baseOf(model) {
  return model.startsWith("ft:") ? model.split(":")[1] : model;
}

export function renderPlayground(root, signal, params) {
  const tuned = h("select", { name: "tuned-model" }, h("option", { value: "", text: "Loading models…" }));
  const base = h("select", { name: "base-model" });
  const message = h("textarea", { name: "message", rows: 3, placeholder: "Count from 3:" });
  const maxTokens = h("input", { type: "number", name: "max_tokens", min: "1", value: "32" });
  const temperature = h("input", { type: "number", name: "temperature", min: "0", max: "2", step: "0.1", value: "0" });
  const send = h("button", { type: "submit", class: "primary", text: "Send" });
  const notice = h("div", { "aria-live": "polite" });
  const columns = [tuned, base].map((select, index) => {
    const output = h("pre", { class: "preview", "aria-label": index === 0 ? "Fine-tuned answer" : "Base answer", "aria-live": "off" });
    const title = h("h2", { text: index === 0 ? "Fine-tuned" : "Base" });
    const problem = h("div", { "aria-live": "polite" });
    const count = h("p", { class: "small muted" });
    return { select, output, title, problem, count, panel: h("section", { class: "panel" }, title, output, count, problem) };
  });
  let running = null;

  const form = h("form", { class: "panel stack" },
    h("div", { class: "fields" }, field("Fine-tuned model", tuned), field("Base model", base),
      field("Max tokens", maxTokens), field("Temperature", temperature, "0 answers the same every time.")),
    field("Message", message, "Sent as one user message to both models."), h("div", { class: "actions" }, send), notice);
  root.append(h("div", { class: "page-head" }, h("h1", { text: "Playground" })), h("div", { class: "stack" }, form,
    h("div", { class: "grid" }, columns.map((column) => column.panel))));

  tuned.addEventListener("change", () => { if (tuned.value) base.value = baseOf(tuned.value); });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!message.value.trim()) return;
    running?.abort();
    running = new AbortController();
    const stop = running;
    signal.addEventListener("abort", () => stop.abort());
    fill(notice);
    send.disabled = true;
    const body = { messages: [{ role: "user", content: message.value }], max_tokens: Number(maxTokens.value) || 32,
      temperature: Number(temperature.value) || 0, stream: true };
    await Promise.all(columns.map(async (column) => {
      column.title.textContent = column.select.value || "—";
      column.output.textContent = "";
      column.count.textContent = "";
      fill(column.problem);
      if (!column.select.value) return;
      try {
        await streamCompletion({ ...body, model: column.select.value }, (text) => {
          column.output.textContent += text;
          column.count.textContent = `${column.output.textContent.length} characters streamed`;
        }, stop.signal);
      } catch (error) {
        if (!stop.signal.aborted) fill(column.problem, errorNotice(error.message));
      }
    }));
    send.disabled = false;
  });

  api("/v1/models", { signal }).then((models) => {
    const bases = models.data.filter((model) => model.owned_by === "safetrain");
    const fine = models.data.filter((model) => model.owned_by !== "safetrain");
    fill(tuned, fine.length ? fine.map((model) => h("option", { value: model.id, text: model.id })) : h("option", { value: "", text: "No fine-tuned model yet" }));
    fill(base, bases.map((model) => h("option", { value: model.id, text: model.id })));
    const wanted = params.get("model");
    if (wanted && fine.some((model) => model.id === wanted)) tuned.value = wanted;
    if (tuned.value) base.value = baseOf(tuned.value);
  }).catch((error) => { if (!signal.aborted) fill(notice, errorNotice(error.message)); });
}
