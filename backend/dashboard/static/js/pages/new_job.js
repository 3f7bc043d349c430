// New job: upload (pick or drop, with progress and the server's line-numbered errors), preview, model,
// hyperparameters and training options with their help, the live memory estimate, and "Create job".

import { api, uploadFile } from "../api.js";
import { checkbox, errorNotice, field, fill, h } from "../dom.js";
import { bytes } from "../format.js";

const PREVIEW_BYTES = 64 * 1024;
const PREVIEW_EXAMPLES = 3;

// [name, label, kind, default, help]: the API's `training` vocabulary (train_safe.py's flags).
const TRAINING = [
  ["use_lora", "LoRA", "bool", true, "Train small LoRA adapters instead of every weight (far less memory)."],
  ["lora_r", "LoRA rank", "int", "", "Rank of the adapter matrices (default 8)."],
  ["lora_alpha", "LoRA alpha", "int", "", "Scaling of the adapter's update (default 16)."],
  ["lora_dropout", "LoRA dropout", "float", "", "Dropout on the adapter path, in [0, 1) (default 0.05)."],
  ["quantization", "Quantize weights", "choice:none|8-bit|4-bit", "none", "Load the frozen weights in 8-bit or 4-bit NF4 (needs a GPU)."],
  ["gradient_checkpointing", "Gradient checkpointing", "choice:auto|on|off", "auto", "Recompute activations in backward: less memory, ~30% slower. Auto turns it on when needed."],
  ["precision", "Precision", "choice:fp32|fp16|bf16", "fp32", "Mixed precision on GPUs (bf16 where supported)."],
  ["per_device_train_batch_size", "Micro-batch", "int", "", "Examples per device per forward pass (default 2)."],
  ["gradient_accumulation_steps", "Accumulation steps", "int", "", "Micro-batches summed before each optimizer step (default 1)."],
  ["max_steps", "Max steps", "int", "", "Stop after this many optimizer steps (default: the epochs decide)."],
  ["max_seq_length", "Max sequence length", "int", "", "Tokens per example; longer ones are truncated (default 512)."],
  ["warmup_ratio", "Warmup ratio", "float", "", "Fraction of steps spent warming the learning rate up (default 0)."],
  ["weight_decay", "Weight decay", "float", "", "AdamW weight decay (default 0)."],
  ["save_steps", "Save every", "int", "", "Checkpoint every N steps (default: at the end only)."],
  ["logging_steps", "Log every", "int", "", "Report loss and memory every N steps (default 10)."],
  ["packing", "Packing", "bool", false, "Pack short examples into full-length sequences."],
  ["train_on_completions_only", "Completions only", "bool", false, "Compute the loss only on completions / assistant turns."],
];
const HYPER = [
  ["n_epochs", "Epochs", "auto", "Passes over the training data, or auto."],
  ["batch_size", "Batch size", "auto", "Effective batch (micro-batch × accumulation), or auto."],
  ["learning_rate_multiplier", "Learning-rate multiplier", "auto", "Scales the default learning rate (2e-4 with LoRA), or auto."],
];

function numberOrAuto(text) {
  const value = text.trim();
  if (!value || value === "auto") return undefined;
  return Number(value);
}

export function renderNewJob(root, signal) {
  const chosen = { training: null, validation: null };
  const controls = {};
  const form = h("form", { class: "stack", novalidate: true });
  const message = h("div", { "aria-live": "polite" });
  const model = h("select", { name: "model", required: true }, h("option", { value: "", text: "Loading models…" }));
  const estimateSlot = h("div", { "aria-live": "polite" }, h("p", { class: "muted small", text: "Choose a model to see the memory estimate." }));
  const create = h("button", { type: "submit", class: "primary", text: "Create job" });

  const trainingPicker = filePicker("Training file", "training", true);
  const validationPicker = filePicker("Validation file (optional)", "validation", false);

  const hyperFields = HYPER.map(([name, label, placeholder, help]) => {
    controls[name] = h("input", { type: "text", name, placeholder, inputmode: "decimal" });
    return field(label, controls[name], help);
  });
  const trainingFields = TRAINING.map(([name, label, kind, value, help]) => {
    if (kind === "bool") {
      controls[name] = h("input", { type: "checkbox", name, checked: value });
      return checkbox(label, controls[name], help);
    }
    if (kind.startsWith("choice:")) {
      controls[name] = h("select", { name }, kind.slice(7).split("|").map((option) => h("option", { value: option, text: option, selected: option === value })));
      return field(label, controls[name], help);
    }
    controls[name] = h("input", { type: "number", name, step: kind === "float" ? "any" : "1", min: "0", value });
    return field(label, controls[name], help);
  });
  const suffix = h("input", { type: "text", name: "suffix", maxlength: "64", placeholder: "my-experiment" });
  const seed = h("input", { type: "number", name: "seed", step: "1", placeholder: "42" });
  const metadata = h("textarea", { name: "metadata", placeholder: "team=nlp\nticket=123" });

  form.append(
    h("div", { class: "grid" },
      h("section", { class: "panel stack" }, h("h2", { text: "Data" }), trainingPicker.element, validationPicker.element),
      h("section", { class: "panel stack" }, h("h2", { text: "Model and memory" }),
        field("Model", model, "A base model folder of this deployment (GET /v1/models)."), estimateSlot)),
    h("fieldset", { class: "panel" }, h("legend", { text: "Hyperparameters" }), h("div", { class: "fields" }, hyperFields)),
    h("fieldset", { class: "panel" }, h("legend", { text: "Training options" }), h("div", { class: "fields" }, trainingFields)),
    h("fieldset", { class: "panel" }, h("legend", { text: "Naming" }), h("div", { class: "fields" },
      field("Suffix", suffix, "Part of the fine-tuned model's name: letters, digits, - and _."),
      field("Seed", seed, "Random seed (default 42)."),
      field("Metadata", metadata, "key=value, one pair a line (at most 16)."))),
    message,
    h("div", { class: "actions" }, create, h("a", { href: "#/jobs", text: "Cancel" })));
  root.append(h("div", { class: "page-head" }, h("a", { href: "#/jobs", text: "← Jobs" })),
    h("div", { class: "page-head" }, h("h1", { text: "New fine-tuning job" })), form);

  function filePicker(labelText, slot, required) {
    const input = h("input", { type: "file", accept: ".jsonl,application/jsonl,application/x-ndjson,text/plain", required });
    const existing = h("select", { "aria-label": `${labelText}: an uploaded file` }, h("option", { value: "", text: "or choose an uploaded file…" }));
    const bar = h("span");
    const progress = h("div", { class: "progress", role: "progressbar", "aria-label": `${labelText} upload`, hidden: true }, bar);
    const status = h("div", { "aria-live": "polite" });
    const preview = h("div");
    const zone = h("div", { class: "dropzone", dataset: { slot } },
      h("label", { for: input.id || (input.id = `file-${slot}`), text: labelText }),
      h("span", { class: "muted small", text: "Drop a JSONL file here, or pick one:" }), input);
    zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      const file = event.dataTransfer?.files?.[0];
      if (file) send(file);
    });
    input.addEventListener("change", () => input.files[0] && send(input.files[0]));
    existing.addEventListener("change", () => {
      chosen[slot] = existing.value || null;
      fill(status);
      fill(preview);
      scheduleEstimate();
    });

    async function send(file) {
      chosen[slot] = null;
      progress.hidden = false;
      bar.style.width = "0%";
      fill(status, h("p", { class: "small muted", text: `Uploading ${file.name} (${bytes(file.size)})…` }));
      showPreview(file);
      try {
        const uploaded = await uploadFile(file, "fine-tune", (fraction) => { bar.style.width = `${(fraction * 100).toFixed(0)}%`; });
        bar.style.width = "100%";
        chosen[slot] = uploaded.id;
        existing.value = "";
        fill(status, h("div", { class: "notice ok", dataset: { fileId: uploaded.id } },
          `${uploaded.filename}: ${uploaded.n_examples ?? "?"} examples, ${uploaded.format ?? "unknown"} format, ${bytes(uploaded.bytes)} `,
          h("span", { class: "mono small", text: `(${uploaded.id})` })));
      } catch (error) {
        progress.hidden = true;
        fill(status, errorNotice(`${file.name}: ${error.message}`));
      }
      scheduleEstimate();
    }

    async function showPreview(file) {
      const text = await file.slice(0, PREVIEW_BYTES).text();
      const lines = text.split("\n").filter((line) => line.trim()).slice(0, PREVIEW_EXAMPLES);
      const shown = lines.map((line, index) => {
        try {
          return `${index + 1}. ${JSON.stringify(JSON.parse(line), null, 1)}`;
        } catch {
          return `${index + 1}. ${line.slice(0, 2000)}`;
        }
      });
      fill(preview, h("h3", { text: `First ${shown.length} example${shown.length === 1 ? "" : "s"}` }),
        h("pre", { class: "preview", "aria-label": `${labelText} preview`, text: shown.join("\n\n") || "(empty)" }));
    }

    async function loadExisting() {
      try {
        const page = await api("/v1/files", { query: { purpose: "fine-tune", limit: 100 }, signal });
        existing.append(...page.data.filter((file) => file.status === "processed").map((file) =>
          h("option", { value: file.id, text: `${file.filename} · ${file.n_examples ?? "?"} examples · ${file.id}` })));
      } catch {
        existing.hidden = true;
      }
    }
    loadExisting();
    return { element: h("div", null, zone, existing, progress, status, preview) };
  }

  function trainingBody() {
    const training = {};
    for (const [name, , kind] of TRAINING) {
      const control = controls[name];
      if (kind === "bool") training[name] = control.checked;
      else if (name === "quantization") {
        if (control.value === "8-bit") training.use_8bit = true;
        if (control.value === "4-bit") training.use_4bit = true;
      } else if (name === "gradient_checkpointing") {
        if (control.value !== "auto") training.gradient_checkpointing = control.value === "on";
      } else if (name === "precision") {
        if (control.value !== "fp32") training[control.value] = true;
      } else if (control.value !== "") training[name] = Number(control.value);
    }
    return training;
  }

  function hyperBody() {
    const hyper = {};
    for (const [name] of HYPER) {
      const value = numberOrAuto(controls[name].value);
      if (value !== undefined) hyper[name] = value;
    }
    return hyper;
  }

  function metadataBody() {
    const pairs = metadata.value.split("\n").map((line) => line.trim()).filter(Boolean);
    if (!pairs.length) return undefined;
    return Object.fromEntries(pairs.map((line) => {
      const at = line.indexOf("=");
      return at < 0 ? [line, ""] : [line.slice(0, at).trim(), line.slice(at + 1).trim()];
    }));
  }

  function applyChanges(changes) {
    for (const [name, value] of Object.entries(changes)) {
      if (name === "use_4bit" && value) controls.quantization.value = "4-bit";
      else if (name === "use_8bit" && value) controls.quantization.value = "8-bit";
      else if (name === "gradient_checkpointing") controls.gradient_checkpointing.value = value ? "on" : "off";
      else if (controls[name]?.type === "checkbox") controls[name].checked = Boolean(value);
      else if (controls[name]) controls[name].value = String(value);
    }
    scheduleEstimate();
  }

  let estimateTimer = null;
  let estimateRun = 0;
  function scheduleEstimate() {
    clearTimeout(estimateTimer);
    estimateTimer = setTimeout(estimate, 350);
  }
  async function estimate() {
    if (!model.value || signal.aborted) return;
    const run = ++estimateRun;
    estimateSlot.setAttribute("aria-busy", "true");
    if (!estimateSlot.querySelector(".bars")) fill(estimateSlot, h("p", { class: "muted small", text: "Estimating…" }));
    try {
      const plan = await api("/v1/fine_tuning/estimate", { method: "POST", signal,
        body: { model: model.value, hyperparameters: hyperBody(), training: trainingBody() } });
      if (run === estimateRun) showEstimate(plan);
    } catch (error) {
      if (run === estimateRun && !signal.aborted) fill(estimateSlot, errorNotice(error.message));
    } finally {
      if (run === estimateRun) estimateSlot.removeAttribute("aria-busy");
    }
  }
  function showEstimate(plan) {
    const scale = Math.max(plan.estimate_bytes, plan.budget_bytes, 1);
    const bar = (label, value, cls = "") => {
      const span = h("span");
      span.style.width = `${Math.min(100, (100 * value) / scale).toFixed(1)}%`;
      return h("div", { class: "bar-row" }, h("span", { text: label }), h("div", { class: `bar ${cls}` }, span), h("span", { class: "num small", text: bytes(value) }));
    };
    const changes = plan.recommended_changes || {};
    const apply = Object.keys(changes).length ? h("button", { type: "button", text: "Apply recommendation", onclick: () => applyChanges(changes) }) : null;
    fill(estimateSlot, 
      h("div", { class: "estimate-head" }, h("span", { class: "big", text: bytes(plan.estimate_bytes) }),
        h("span", { class: `badge ${plan.fits ? "succeeded" : "failed"}`, text: plan.fits ? "fits" : "does not fit" })),
      h("p", { class: "small muted", text: `Budget: ${bytes(plan.budget_bytes)} free on ${plan.device || "the device"}.` }),
      h("div", { class: "bars", "aria-label": "Memory estimate" },
        ...Object.entries(plan.breakdown || {}).map(([part, value]) => bar(part, value)),
        bar("total", plan.estimate_bytes, plan.fits ? "" : "over"), bar("budget", plan.budget_bytes, "peak")),
      plan.recommendation ? h("p", { class: "small", text: `Recommendation: ${plan.recommendation}` }) : null,
      apply);
  }

  form.addEventListener("input", scheduleEstimate);
  form.addEventListener("change", scheduleEstimate);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    fill(message);
    if (!chosen.training) {
      fill(message, errorNotice("Upload or choose a training file first."));
      return;
    }
    const body = { model: model.value, training_file: chosen.training, hyperparameters: hyperBody(), training: trainingBody() };
    if (chosen.validation) body.validation_file = chosen.validation;
    if (suffix.value.trim()) body.suffix = suffix.value.trim();
    if (seed.value !== "") body.seed = Number(seed.value);
    const meta = metadataBody();
    if (meta) body.metadata = meta;
    create.disabled = true;
    try {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", body, signal });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      fill(message, errorNotice(error.param ? `${error.param}: ${error.message}` : error.message));
    } finally {
      create.disabled = false;
    }
  });

  (async () => {
    try {
      const models = await api("/v1/models", { signal });
      const base = models.data.filter((entry) => entry.owned_by === "safetrain");
      fill(model, ...(base.length ? base : models.data).map((entry) => h("option", { value: entry.id, text: entry.id })));
      scheduleEstimate();
    } catch (error) {
      if (!signal.aborted) fill(model, h("option", { value: "", text: `Models unavailable: ${error.message}` }));
    }
  })();
}
