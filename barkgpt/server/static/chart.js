// A small SVG line chart for the training view: linear axes with "nice" ticks, one polyline per
// series (optional dots), a legend, and an aria-label that says what the curve shows.
// Redraws itself when its container changes width.

const NS = "http://www.w3.org/2000/svg";
const MARGIN = { left: 54, right: 14, top: 26, bottom: 30 };

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

/** About `count` round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]. */
export function niceTicks(lo, hi, count = 5) {
  const raw = (hi - lo) / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).reduce((a, b) => (Math.abs(Math.log(b / raw)) < Math.abs(Math.log(a / raw)) ? b : a));
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return { ticks, step };
}

function range(values, pad) {
  let lo = Math.min(...values), hi = Math.max(...values);
  if (lo === hi) { const d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
  const p = (hi - lo) * pad;
  return [lo - p, hi + p];
}

function autoFormat(step) {
  if (step < 1e-3) return (y) => y.toExponential(1);
  const digits = Math.max(0, Math.min(6, -Math.floor(Math.log10(step))));
  return (y) => y.toFixed(digits);
}

/**
 * Draw a line chart into `container` (replacing what was there).
 * @param {HTMLElement} container
 * @param {{name: string, color: string, points: number[][], dots?: boolean}[]} series  [x, y] pairs
 * @param {{title?: string, height?: number, format?: (y: number) => string}} options
 */
export function lineChart(container, series, options = {}) {
  container._chart = { series, options };
  if (!container._observed && "ResizeObserver" in window) {
    let width = container.clientWidth;
    new ResizeObserver(() => {
      if (container.clientWidth !== width && container._chart) {
        width = container.clientWidth;
        lineChart(container, container._chart.series, container._chart.options);
      }
    }).observe(container);
    container._observed = true;
  }
  const width = Math.max(240, container.clientWidth || 600);
  const height = options.height || 220;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img" });
  const shown = series.map((s) => ({ ...s, points: s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y)) }));
  const all = shown.flatMap((s) => s.points);
  const title = options.title || "chart";
  if (!all.length) {
    root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, "no data yet"));
    root.setAttribute("aria-label", `${title}: no data yet`);
    container.replaceChildren(root);
    return;
  }
  const [x0, x1] = range(all.map((p) => p[0]), 0);
  const [y0, y1] = range(all.map((p) => p[1]), 0.06);
  const w = width - MARGIN.left - MARGIN.right, h = height - MARGIN.top - MARGIN.bottom;
  const sx = (x) => MARGIN.left + ((x - x0) / (x1 - x0)) * w;
  const sy = (y) => MARGIN.top + (1 - (y - y0) / (y1 - y0)) * h;

  const yt = niceTicks(y0, y1, Math.max(2, Math.round(h / 45)));
  const fmt = options.format || autoFormat(yt.step);
  for (const t of yt.ticks) {
    root.append(svg("line", { class: "grid-line", x1: MARGIN.left, x2: width - MARGIN.right, y1: sy(t), y2: sy(t) }));
    root.append(svg("text", { x: MARGIN.left - 6, y: sy(t) + 4, "text-anchor": "end" }, fmt(t)));
  }
  for (const t of niceTicks(x0, x1, Math.max(2, Math.round(w / 90))).ticks) {
    root.append(svg("line", { class: "grid-line", x1: sx(t), x2: sx(t), y1: MARGIN.top, y2: height - MARGIN.bottom }));
    root.append(svg("text", { x: sx(t), y: height - MARGIN.bottom + 16, "text-anchor": "middle" }, String(t)));
  }
  root.append(svg("line", { class: "axis", x1: MARGIN.left, x2: width - MARGIN.right, y1: height - MARGIN.bottom, y2: height - MARGIN.bottom }));
  root.append(svg("text", { x: width - MARGIN.right, y: height - 2, "text-anchor": "end" }, "step"));

  const said = [];
  let legendX = MARGIN.left;
  for (const s of shown) {
    if (!s.points.length) continue;
    const pts = s.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
    const [lastX, lastY] = s.points[s.points.length - 1];
    root.append(svg("polyline", {
      points: pts, fill: "none", stroke: s.color, "stroke-width": s.dots ? 2 : 1.6, "stroke-linejoin": "round",
      "data-series": s.name, "data-count": s.points.length, "data-last-x": lastX,
    }));
    if (s.dots) for (const [x, y] of s.points) root.append(svg("circle", { cx: sx(x), cy: sy(y), r: 3, fill: s.color }));
    root.append(svg("rect", { x: legendX, y: 8, width: 12, height: 4, rx: 2, fill: s.color }));
    const label = `${s.name} ${options.format ? fmt(lastY) : lastY.toPrecision(4)}`;
    root.append(svg("text", { x: legendX + 16, y: 14 }, label));
    legendX += 28 + label.length * 6.5;
    said.push(`${s.name}: ${s.points.length} points, last ${label.slice(s.name.length + 1)} at step ${lastX}`);
  }
  root.setAttribute("aria-label", `${title}. ${said.join("; ")}`);
  container.replaceChildren(root);
}
