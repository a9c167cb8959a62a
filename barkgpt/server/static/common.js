// Shared by the chat view and the training view: the API key, JSON calls that turn error
// bodies into messages, and a few formatting helpers. No dependencies, no build step.

const KEY_STORAGE = "barkgpt-api-key";

/** The element with this id. */
export const $ = (id) => document.getElementById(id);

/** The API key the user gave (kept in this browser's localStorage), or "". */
export function apiKey() {
  try { return localStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

/** Headers for an API call: JSON, and the key as "Authorization: Bearer KEY" when there is one. */
export function headers(extra = {}) {
  const h = { "Content-Type": "application/json", ...extra };
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** An error answer of the API: its message, HTTP status and error code. */
export class ApiCallError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** The error of a non-2xx response, read from OpenAI's {"error": {...}} body when it has one.
 * A 401 also opens the API key form. */
export async function responseError(resp) {
  let message = `${resp.status} ${resp.statusText}`.trim();
  let code = null;
  try {
    const body = await resp.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch { /* not JSON: keep the status line */ }
  if (resp.status === 401) showKeyPanel(message);
  return new ApiCallError(message, resp.status, code);
}

/** Call a JSON route; resolves to the parsed body, rejects with an ApiCallError. */
export async function api(path, { method = "GET", body, signal } = {}) {
  let resp;
  try {
    resp = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body), signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiCallError(`cannot reach the server (${e.message})`, 0, "network_error");
  }
  if (!resp.ok) throw await responseError(resp);
  return resp.json();
}

// ---- the top bar: page links and the API key panel -------------------------------------------

let keyPanel = null;

/** Mark `page` ("chat" or "train") as current, and wire the API key button and panel;
 * `onKeyChange` runs after the key is saved or forgotten. */
export function setupPage(page, onKeyChange) {
  document.title = page === "train" ? "BarkGPT training" : "BarkGPT chat";
  document.getElementById(`nav-${page}`).setAttribute("aria-current", "page");
  keyPanel = document.getElementById("key-panel");
  const button = document.getElementById("key-button");
  const input = document.getElementById("key-input");
  const label = () => { button.textContent = apiKey() ? "API key \u2713" : "API key"; };
  label();
  button.addEventListener("click", () => {
    keyPanel.hidden = !keyPanel.hidden;
    if (!keyPanel.hidden) input.focus();
  });
  keyPanel.addEventListener("submit", (e) => {
    e.preventDefault();
    try { localStorage.setItem(KEY_STORAGE, input.value.trim()); } catch { /* private mode: nothing kept */ }
    input.value = "";
    keyPanel.hidden = true;
    label();
    onKeyChange();
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    try { localStorage.removeItem(KEY_STORAGE); } catch { /* nothing to forget */ }
    label();
    onKeyChange();
  });
}

/** Open the key panel with a message (after a 401). */
export function showKeyPanel(message) {
  if (!keyPanel) return;
  keyPanel.hidden = false;
  document.getElementById("key-message").textContent = message;
  document.getElementById("key-input").focus();
}

// ---- helpers ---------------------------------------------------------------------------------

/** A new element: el("div", {class: "x"}, "text", child, ...). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

/** A number with `digits` decimals, or "–" for none. */
export function num(x, digits = 4) {
  return typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "\u2013";
}

/** Seconds as "42 s", "3 min 05 s" or "1 h 02 min"; "–" for none. */
export function duration(s) {
  if (typeof s !== "number" || !Number.isFinite(s)) return "\u2013";
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor(s / 60) % 60).padStart(2, "0")} min`;
}

/** A past Unix time (seconds) as "12 s ago", "8 min ago" or "2 h 05 min ago". */
export function ago(t) {
  if (typeof t !== "number") return "\u2013";
  const s = Math.max(0, Date.now() / 1000 - t);
  return `${s < 60 || s >= 3600 ? duration(s) : `${Math.floor(s / 60)} min`} ago`;
}

/** A byte count as "1.2 MB". */
export function bytes(n) {
  if (n < 1e3) return `${n} B`;
  return n < 1e6 ? `${(n / 1e3).toFixed(1)} kB` : `${(n / 1e6).toFixed(1)} MB`;
}
