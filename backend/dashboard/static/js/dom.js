// Building DOM nodes. Text is always set as text (never parsed as HTML): API data can hold any characters.

const SVG_NS = "http://www.w3.org/2000/svg";

function apply(node, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "class") node.setAttribute("class", value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "value" || key === "checked" || key === "disabled" || key === "hidden") node[key] = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** An HTML element: h("a", {href: "#/jobs"}, "Jobs"); strings become text nodes. */
export function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  apply(node, attrs);
  append(node, children);
  return node;
}

/** An SVG element. */
export function s(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  apply(node, attrs);
  append(node, children);
  return node;
}

/** Replace every child of `node`. */
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

let uid = 0;
/** A unique element id with a readable prefix. */
export function nextId(prefix) {
  uid += 1;
  return `${prefix}-${uid}`;
}

/** A labelled form field: label, control, and a help line the control is described by. */
export function field(labelText, control, help) {
  control.id ||= nextId("f");
  const parts = [h("label", { for: control.id, text: labelText }), control];
  if (help) {
    const helpId = nextId("help");
    control.setAttribute("aria-describedby", helpId);
    parts.push(h("small", { class: "help", id: helpId, text: help }));
  }
  return h("div", { class: "field" }, parts);
}

/** A checkbox with its label beside it. */
export function checkbox(labelText, input, help) {
  input.id ||= nextId("c");
  const label = h("label", { for: input.id, text: labelText });
  const body = [label];
  if (help) {
    const helpId = nextId("help");
    input.setAttribute("aria-describedby", helpId);
    body.push(h("small", { class: "help", id: helpId, text: help }));
  }
  return h("div", { class: "field check" }, input, h("div", null, body));
}

/** A definition list from [term, value] pairs; values may be nodes or text. */
export function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.map(([term, value]) => [h("dt", { text: term }), h("dd", null, value ?? "—")]));
}

/** A status badge. */
export function badge(status) {
  return h("span", { class: `badge ${status}`, text: String(status).replace("_", " ") });
}

/** An error notice (role=alert) with the message as text. */
export function errorNotice(message) {
  return h("div", { class: "notice error", role: "alert", text: message });
}
