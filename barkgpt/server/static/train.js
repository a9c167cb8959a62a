// The training view (/train): lists the runs under `barkgpt serve --runs DIR`, shows one run live (loss and
// learning-rate curves, step, tokens/s, ETA, samples, checkpoints, config, log), starts a run from a
// preset, stops it, and loads a run's checkpoint into the chat view. Reads /v1/presets and /v1/runs.

import { $, ago, api, bytes, duration, el, num, setupPage } from "/static/common.js";
import { lineChart } from "/static/chart.js";

const LIST_EVERY_MS = 3000; // how often the run list refreshes
const LIVE_EVERY_MS = 1000; // how often a training run refreshes
const IDLE_EVERY_MS = 5000; // how often a run that is not training refreshes
const LIVE = new Set(["training", "stopping", "active"]);

let selected = decodeURIComponent(location.hash.slice(1)) || null;
let presets = [];
let listShown = ""; // what the run list shows, to redraw only on change
let chartsShown = "";
let configShown = "";
let runTimer = null;

// ---- the run list --------------------------------------------------------------------------

async function refreshList() {
  try {
    const body = await api("/v1/runs");
    $("info").textContent = body.runs_dir ? `runs in ${body.runs_dir}` : "no runs folder: start barkgpt serve with --runs DIR";
    renderList(body.data);
    if (!selected && body.data.length) select(body.data[0].name);
    if (!body.data.length) $("new-run").open = true;
  } catch (e) {
    $("info").textContent = `cannot list runs: ${e.message}`;
  }
}

function renderList(runs) {
  const shown = JSON.stringify([selected, runs.map((r) => [r.name, r.status, r.step, r.max_iters, r.val_loss])]);
  if (shown === listShown) return;
  listShown = shown;
  const focused = document.activeElement?.dataset?.run;
  $("run-list").replaceChildren(...runs.map((r) => {
    const sub = [`step ${r.step}${r.max_iters ? ` / ${r.max_iters}` : ""}`];
    if (r.val_loss !== null) sub.push(`val ${num(r.val_loss, 3)}`);
    const button = el("button", { type: "button", "data-run": r.name, "aria-current": r.name === selected ? "true" : "false",
      onclick: () => select(r.name) },
      el("span", { class: "name" }, r.name), el("span", { class: `badge ${r.status}` }, r.status),
      el("span", { class: "sub" }, sub.join(" \u00b7 ")));
    return el("li", {}, button);
  }));
  if (focused) document.querySelector(`[data-run="${CSS.escape(focused)}"]`)?.focus();
}

function select(name) {
  selected = name;
  history.replaceState(null, "", `#${encodeURIComponent(name)}`);
  chartsShown = configShown = listShown = "";
  $("run-error").textContent = "";
  refreshList();
  refreshRun();
}

// ---- one run -------------------------------------------------------------------------------

async function refreshRun() {
  clearTimeout(runTimer);
  if (!selected) return;
  const name = selected;
  let wait = IDLE_EVERY_MS;
  try {
    const run = await api(`/v1/runs/${encodeURIComponent(name)}`);
    if (name !== selected) return; // another run was picked meanwhile
    renderRun(run);
    if (LIVE.has(run.status)) wait = LIVE_EVERY_MS;
  } catch (e) {
    $("no-run").hidden = false;
    $("no-run").textContent = `Cannot show the run '${name}': ${e.message}`;
    $("run").hidden = true;
  }
  runTimer = setTimeout(refreshRun, wait);
}

function stat(label, value) {
  return el("div", {}, el("dt", {}, label), el("dd", {}, value));
}

function renderRun(run) {
  $("no-run").hidden = true;
  $("run").hidden = false;
  $("run-title").textContent = run.name;
  $("run-status").textContent = run.status;
  $("run-status").className = `badge ${run.status}`;
  $("stop-run").hidden = run.status !== "training";
  $("load-run").hidden = !run.has_checkpoint;
  const stats = [
    stat("step", run.max_iters ? `${run.step} / ${run.max_iters}` : String(run.step)),
    stat("train loss", num(run.train_loss)),
    stat("val loss", num(run.val_loss)),
    stat("best val loss", num(run.best_val_loss)),
    stat("tokens/s", typeof run.tokens_per_s === "number" ? Math.round(run.tokens_per_s).toLocaleString("en") : "\u2013"),
    stat("learning rate", typeof run.lr === "number" ? run.lr.toExponential(2) : "\u2013"),
    stat("elapsed", duration(run.elapsed_s)),
    stat("ETA", LIVE.has(run.status) ? duration(run.eta_s) : "\u2013"),
  ];
  $("run-updated").textContent = `updated ${ago(run.updated)}`;
  $("stats").replaceChildren(...stats);
  $("progress").style.width = run.max_iters ? `${Math.min(100, (100 * run.step) / run.max_iters)}%` : "0";
  renderCharts(run.metrics);
  renderSamples(run.samples);
  renderCheckpoints(run.checkpoints);
  renderConfig(run.config);
  $("log-card").hidden = !run.log.length;
  $("log").textContent = run.log.join("\n");
}

function renderCharts(rows) {
  const last = rows[rows.length - 1];
  const shown = `${rows.length}:${last ? last.step : ""}`;
  if (shown === chartsShown) return;
  chartsShown = shown;
  const series = (key) => rows.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]);
  lineChart($("loss-chart"), [
    { name: "train", color: "#2f62d8", points: series("train_loss") },
    { name: "val", color: "#e0701b", points: series("val_loss"), dots: true },
  ], { title: "Loss" });
  lineChart($("lr-chart"), [{ name: "lr", color: "#6b7385", points: series("lr") }],
    { title: "Learning rate", format: (y) => y.toExponential(1) });
}

function renderSamples(samples) {
  const items = samples.slice().reverse().map((s) => el("li", {},
    el("span", { class: "step" }, `step ${s.step}`), el("span", { class: "muted" }, s.prompt || ""),
    (s.prompt ? " " : "") + (s.text || "")));
  $("samples").replaceChildren(...(items.length ? items : [el("li", { class: "muted" }, "none yet (written at each evaluation)")]));
}

function renderCheckpoints(checkpoints) {
  const head = el("tr", {}, ...["", "step", "val loss", "size", "saved"].map((h) => el("th", {}, h)));
  const rows = checkpoints.map((c) => el("tr", {}, el("td", {}, `${c.name}/`), el("td", {}, String(c.step ?? "\u2013")),
    el("td", {}, num(c.val_loss)), el("td", {}, bytes(c.bytes)), el("td", {}, ago(c.modified))));
  $("checkpoints").replaceChildren(...(rows.length ? [head, ...rows] : [el("tr", {}, el("td", { class: "muted" }, "none yet"))]));
}

function renderConfig(config) {
  const shown = JSON.stringify(config);
  if (shown === configShown) return;
  configShown = shown;
  const rows = [];
  for (const [section, values] of Object.entries(config || {})) {
    for (const [key, value] of Object.entries(values || {})) {
      rows.push(el("div", {}, el("dt", {}, `${section}.${key}`), el("dd", {}, value === null ? "null" : String(value))));
    }
  }
  $("config").replaceChildren(...(rows.length ? rows : [el("p", { class: "muted" }, "no config.yaml yet")]));
}

async function runAction(button, path, busyText) {
  const text = button.textContent;
  button.disabled = true;
  button.textContent = busyText;
  $("run-error").textContent = "";
  try {
    return await api(path, { method: "POST", body: {} });  // JSON, as every state-changing call must be
  } catch (e) {
    $("run-error").textContent = e.message;
    return null;
  } finally {
    button.disabled = false;
    button.textContent = text;
  }
}

$("stop-run").addEventListener("click", async () => {
  if (await runAction($("stop-run"), `/v1/runs/${encodeURIComponent(selected)}/stop`, "Stopping\u2026")) refreshRun();
});
$("load-run").addEventListener("click", async () => {
  if (await runAction($("load-run"), `/v1/runs/${encodeURIComponent(selected)}/load`, "Loading\u2026")) location.href = "/";
});

// ---- starting a run ------------------------------------------------------------------------

function suggestName(preset) {
  const t = new Date();
  const two = (n) => String(n).padStart(2, "0");
  return `${preset}-${two(t.getMonth() + 1)}${two(t.getDate())}-${two(t.getHours())}${two(t.getMinutes())}${two(t.getSeconds())}`;
}

function showPreset() {
  const preset = presets.find((p) => p.name === $("preset").value);
  if (!preset) return;
  $("preset-description").textContent = preset.description;
  for (const [key, value] of Object.entries(preset.settings)) {
    const input = $("start-form").elements[key];
    if (input) input.placeholder = value === null ? (key === "data" ? "required: a prepared folder or text file" : "") : String(value);
  }
  const name = $("run-name-input");
  if (!name.dataset.edited) name.value = suggestName(preset.name);
}

async function loadPresets() {
  try {
    presets = (await api("/v1/presets")).data;
  } catch (e) {
    $("start-error").textContent = `cannot list presets: ${e.message}`;
    return;
  }
  $("preset").replaceChildren(...presets.map((p) => el("option", { value: p.name, selected: p.name === "bark" }, p.name)));
  showPreset();
}

$("preset").addEventListener("change", showPreset);
$("run-name-input").addEventListener("input", (e) => { e.target.dataset.edited = "1"; });
$("start-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = $("start-form");
  const overrides = {};
  for (const input of form.querySelectorAll("input[name]:not([name=name])")) {
    if (input.value.trim() !== "") overrides[input.name] = input.type === "number" ? Number(input.value) : input.value.trim();
  }
  const name = $("run-name-input").value.trim();
  $("start-error").textContent = "";
  $("start").disabled = true;
  try {
    await api("/v1/runs", { method: "POST", body: { name, preset: $("preset").value, overrides } });
    for (const input of form.querySelectorAll("input[name]")) input.value = "";
    delete $("run-name-input").dataset.edited;
    showPreset();
    select(name);
  } catch (err) {
    $("start-error").textContent = err.message;
  } finally {
    $("start").disabled = false;
  }
});

window.addEventListener("hashchange", () => {
  const name = decodeURIComponent(location.hash.slice(1));
  if (name && name !== selected) select(name);
});

function reload() {
  refreshList();
  refreshRun();
  loadPresets();
}

if (window.matchMedia("(min-width: 761px)").matches) $("config-card").open = true;
setupPage("train", reload);
reload();
setInterval(() => { if (!document.hidden) refreshList(); }, LIST_EVERY_MS);
