// The dashboard shell: sign-in, theme, and a hash router (#/jobs, #/jobs/<id>, #/new, #/compare, #/files).

import { api, forgetKey, getKey, onSignedOut, setKey } from "./api.js";
import { errorNotice, field, fill, h } from "./dom.js";
import { renderCompare } from "./pages/compare.js";
import { renderFiles } from "./pages/files.js";
import { renderJob } from "./pages/job.js";
import { renderJobs } from "./pages/jobs.js";
import { renderNewJob } from "./pages/new_job.js";
import { renderPlayground } from "./pages/playground.js";

const main = document.getElementById("main");
const nav = document.querySelector(".nav");
const signOut = document.getElementById("sign-out");
const themeButton = document.getElementById("theme");
let cleanup = null;

const ROUTES = [
  [/^#\/jobs\/([\w-]+)$/, (match) => ["jobs", (root, signal) => renderJob(root, signal, match[1])]],
  [/^#\/new$/, () => ["jobs", renderNewJob]],
  [/^#\/compare(?:\?(.*))?$/, (match) => ["compare", (root, signal) => renderCompare(root, signal, new URLSearchParams(match[1] || ""))]],
  [/^#\/files$/, () => ["files", renderFiles]],
  [/^#\/playground(?:\?(.*))?$/, (match) => ["playground", (root, signal) => renderPlayground(root, signal, new URLSearchParams(match[1] || ""))]],
  [/^#\/jobs(?:\?(.*))?$/, (match) => ["jobs", (root, signal) => renderJobs(root, signal, new URLSearchParams(match[1] || ""))]],
];

function route() {
  cleanup?.abort();
  cleanup = new AbortController();
  const signedIn = Boolean(getKey());
  nav.hidden = !signedIn;
  signOut.hidden = !signedIn;
  if (!signedIn) {
    renderSignIn(main);
    return;
  }
  const hash = location.hash || "#/jobs";
  let section = "jobs";
  let render = null;
  for (const [pattern, make] of ROUTES) {
    const match = hash.match(pattern);
    if (match) {
      [section, render] = make(match);
      break;
    }
  }
  for (const link of nav.querySelectorAll("a")) {
    if (link.dataset.nav === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  fill(main);
  if (!render) {
    location.replace("#/jobs");
    return;
  }
  render(main, cleanup.signal);
}

function renderSignIn(root) {
  const input = h("input", { type: "password", name: "api-key", autocomplete: "off", spellcheck: "false", required: true });
  const message = h("div", { "aria-live": "polite" });
  const submit = h("button", { type: "submit", class: "primary", text: "Sign in" });
  const form = h("form", {
    onsubmit: async (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      submit.disabled = true;
      fill(message);
      try {
        await api("/v1/fine_tuning/jobs", { query: { limit: 1 }, key });
        setKey(key);
        if (!location.hash || location.hash === "#/") location.hash = "#/jobs";
        route();
      } catch (error) {
        fill(message, errorNotice(error.status === 401 ? "That key was not accepted (wrong or revoked)." : error.message));
      } finally {
        submit.disabled = false;
      }
    },
  }, field("API key", input, "From `safetrain keys create --project NAME` (or the key `safetrain up` printed). Kept in this browser only."), submit, message);
  fill(root, h("section", { class: "panel signin" }, h("h1", { text: "Sign in to safetrain" }),
    h("p", { class: "muted", text: "Fine-tuning jobs, their curves and memory, for one project." }), form));
  input.focus();
}

const THEMES = ["system", "light", "dark"];
function applyTheme(theme) {
  if (theme === "system") document.documentElement.removeAttribute("data-theme");
  else document.documentElement.dataset.theme = theme;
  themeButton.setAttribute("aria-label", `Theme: ${theme}`);
  themeButton.textContent = theme === "dark" ? "Dark" : theme === "light" ? "Light" : "Theme";
}
themeButton.addEventListener("click", () => {
  const next = THEMES[(THEMES.indexOf(localStorage.getItem("safetrain.theme") || "system") + 1) % THEMES.length];
  localStorage.setItem("safetrain.theme", next);
  applyTheme(next);
});
applyTheme(localStorage.getItem("safetrain.theme") || "system");

signOut.addEventListener("click", () => {
  forgetKey();
});
onSignedOut(() => route());
window.addEventListener("hashchange", route);
route();
