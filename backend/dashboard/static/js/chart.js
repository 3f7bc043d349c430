// Line charts in SVG: role="img" with an accessible name, the latest values as text, and the data as a table.
// Long series are downsampled here, in the browser: per pixel column the first, lowest, highest and last point
// are kept, so spikes survive and a 100,000-point series draws as about 3,000 points.

import { h, nextId, s } from "./dom.js";
import { number } from "./format.js";

const W = 800;
const H = 260;
const M = { left: 62, right: 14, top: 12, bottom: 28 };
const PLOT_W = W - M.left - M.right;
const PLOT_H = H - M.top - M.bottom;
const MAX_TABLE_ROWS = 1000;

function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const power = 10 ** Math.floor(Math.log10(raw || 1));
  const unit = [1, 2, 2.5, 5, 10].find((m) => m * power >= raw) || 10;
  return unit * power;
}

function ticks(min, max, count) {
  if (!(max > min)) return [min];
  const step = niceStep(max - min, count);
  const out = [];
  for (let value = Math.ceil(min / step) * step; value <= max + step * 1e-9; value += step) out.push(Number(value.toPrecision(12)));
  return out;
}

/** The points to draw for one series: every point when few, else first/min/max/last of each pixel column. */
export function downsample(xs, ys, toPixel, columns = PLOT_W) {
  const n = xs.length;
  if (n <= columns * 4) return { xs, ys };
  const outX = [];
  const outY = [];
  let column = -1;
  let first = -1;
  let low = -1;
  let high = -1;
  let last = -1;
  const flush = () => {
    if (first < 0) return;
    const picked = [first, low, high, last].filter((v, i, all) => all.indexOf(v) === i).sort((a, b) => a - b);
    for (const index of picked) {
      outX.push(xs[index]);
      outY.push(ys[index]);
    }
  };
  for (let i = 0; i < n; i += 1) {
    const c = Math.floor(toPixel(xs[i]));
    if (c !== column) {
      flush();
      column = c;
      first = low = high = last = i;
    } else {
      if (ys[i] < ys[low]) low = i;
      if (ys[i] > ys[high]) high = i;
      last = i;
    }
  }
  flush();
  return { xs: outX, ys: outY };
}

/**
 * A chart: `{element, update(series, refs)}`. series: [{label, cls, xs, ys}], refs: [{label, y, cls}] (dashed
 * horizontal lines such as the memory plan). `summary(series)` writes the text alternative.
 */
export function lineChart({ name, xLabel: initialXLabel = "step", yFormat = number, emptyText = "No data yet", summary }) {
  let xLabel = initialXLabel;
  const summaryId = nextId("chart-summary");
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": name, "aria-describedby": summaryId, preserveAspectRatio: "none" });
  const grid = s("g", { class: "axis" });
  const lines = s("g");
  const refLayer = s("g");
  const empty = s("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle", text: emptyText });
  svg.append(grid, refLayer, lines, empty);
  const summaryText = h("p", { class: "summary", id: summaryId, "aria-live": "off" }, emptyText);
  const legend = h("ul", { class: "legend", "aria-hidden": "true" });
  const tableHolder = h("div", { class: "table-wrap" });
  const details = h("details", { class: "data" }, h("summary", { text: `${name} data` }), tableHolder);
  const element = h("figure", { class: "chart" },
    h("figcaption", null, h("h3", { text: name }), summaryText), svg, legend, details);
  let current = { series: [], refs: [] };
  details.addEventListener("toggle", () => details.open && renderTable());

  function renderTable() {
    const rows = [];
    for (const series of current.series) {
      const start = Math.max(0, series.xs.length - MAX_TABLE_ROWS);
      for (let i = start; i < series.xs.length; i += 1) {
        rows.push(h("tr", { dataset: { series: series.label } },
          h("td", { text: series.label }), h("td", { class: "num", text: String(series.xs[i]) }), h("td", { class: "num", text: String(series.ys[i]) })));
      }
    }
    tableHolder.replaceChildren(h("table", null,
      h("thead", null, h("tr", null, h("th", { text: "series" }), h("th", { class: "num", text: xLabel }), h("th", { class: "num", text: "value" }))),
      h("tbody", null, rows)));
  }

  function update(series, refs = [], xName = xLabel) {
    xLabel = xName;
    current = { series: series.filter((one) => one.xs.length), refs };
    const all = current.series;
    let xMin = Infinity, xMax = -Infinity, yMin = Infinity, yMax = -Infinity;
    for (const one of all) {
      for (let i = 0; i < one.xs.length; i += 1) {
        const x = one.xs[i], y = one.ys[i];
        if (!Number.isFinite(x) || !Number.isFinite(y)) continue;
        if (x < xMin) xMin = x;
        if (x > xMax) xMax = x;
        if (y < yMin) yMin = y;
        if (y > yMax) yMax = y;
      }
    }
    for (const ref of refs) {
      if (Number.isFinite(ref.y) && all.length) {
        yMin = Math.min(yMin, ref.y);
        yMax = Math.max(yMax, ref.y);
      }
    }
    empty.style.display = all.length ? "none" : "";
    legend.replaceChildren(...all.map((one) => h("li", { class: one.cls, text: one.label })),
      ...refs.filter((ref) => Number.isFinite(ref.y)).map((ref) => h("li", { class: ref.cls, text: `${ref.label} (dashed)` })));
    summaryText.textContent = all.length ? (summary ? summary(all) : latestSummary(all, xLabel, yFormat)) : emptyText;
    if (!all.length) {
      grid.replaceChildren();
      lines.replaceChildren();
      refLayer.replaceChildren();
      return;
    }
    if (xMax === xMin) xMax = xMin + 1;
    const pad = (yMax - yMin) * 0.06 || Math.abs(yMax) * 0.06 || 1;
    yMin -= pad;
    yMax += pad;
    if (yMin < 0 && all.every((one) => one.ys.every((y) => !(y < 0)))) yMin = 0;
    const px = (x) => M.left + ((x - xMin) / (xMax - xMin)) * PLOT_W;
    const py = (y) => M.top + (1 - (y - yMin) / (yMax - yMin)) * PLOT_H;
    drawAxes(px, py, xMin, xMax, yMin, yMax);
    lines.replaceChildren(...all.map((one) => {
      const drawn = downsample(one.xs, one.ys, px);
      let d = "";
      let pen = "M";
      for (let i = 0; i < drawn.xs.length; i += 1) {
        if (!Number.isFinite(drawn.ys[i])) {
          pen = "M";
          continue;
        }
        d += `${pen}${px(drawn.xs[i]).toFixed(1)} ${py(drawn.ys[i]).toFixed(1)}`;
        pen = "L";
      }
      return s("path", { class: `series ${one.cls}`, d, dataset: { label: one.label, points: one.xs.length, drawn: drawn.xs.length } });
    }));
    refLayer.replaceChildren(...refs.filter((ref) => Number.isFinite(ref.y)).map((ref) => s("g", null,
      s("line", { class: `ref ${ref.cls}`, x1: M.left, x2: W - M.right, y1: py(ref.y), y2: py(ref.y) }),
      s("text", { class: `ref-label tick`, x: W - M.right - 4, y: py(ref.y) - 4, "text-anchor": "end", text: ref.label }))));
    if (details.open) renderTable();
  }

  function drawAxes(px, py, xMin, xMax, yMin, yMax) {
    const parts = [];
    for (const y of ticks(yMin, yMax, 4)) {
      parts.push(s("line", { class: "grid-line", x1: M.left, x2: W - M.right, y1: py(y), y2: py(y) }));
      parts.push(s("text", { class: "tick", x: M.left - 6, y: py(y) + 4, "text-anchor": "end", text: yFormat(y) }));
    }
    for (const x of ticks(xMin, xMax, 6)) {
      parts.push(s("text", { class: "tick", x: px(x), y: H - 8, "text-anchor": "middle", text: number(x) }));
    }
    parts.push(s("text", { class: "tick", x: W - M.right, y: H - 8, "text-anchor": "end", text: "" }));
    parts.push(s("line", { class: "grid-line", x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom }));
    grid.replaceChildren(...parts);
  }

  return { element, update };
}

function latestSummary(series, xLabel, yFormat) {
  const parts = series.map((one) => {
    const i = one.xs.length - 1;
    return `${one.label} ${yFormat(one.ys[i])} at ${xLabel} ${number(one.xs[i])}`;
  });
  return `Latest: ${parts.join(" · ")}`;
}
