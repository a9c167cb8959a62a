// The chat view (/): talks only to the public OpenAI routes, /v1/models and /v1/chat/completions
// with "stream": true, so it works against any OpenAI-compatible server. Replies grow as the
// server-sent events arrive; Stop (or Esc) aborts the request; errors, and a stream that ends
// without a finish_reason, are shown in the conversation.

import { $, api, ApiCallError, el, headers, responseError, setupPage } from "/static/common.js";

const turns = []; // the {role, content} messages sent with the next request (the system prompt is added then)
let model = null; // the model id from /v1/models
let controller = null; // aborts the reply being streamed

async function loadModel() {
  try {
    const card = (await api("/v1/models")).data?.[0];
    if (!card) throw new Error("the server lists no model");
    model = card.id;
    const context = card.max_model_len ? ` \u00b7 context ${card.max_model_len} tokens` : "";
    $("info").textContent = `model ${card.id}${context}`;
  } catch (e) {
    model = null;
    $("info").textContent = `no model: ${e.message}`;
    if (e.status === 503) setTimeout(loadModel, 1000); // still loading
  }
}

function numberField(id) {
  const v = $(id).value.trim();
  return v === "" || !Number.isFinite(Number(v)) ? undefined : Number(v);
}

/** The request body: sampling fields the user left empty are not sent (the server's defaults apply). */
function requestBody() {
  const system = $("system").value.trim();
  const body = {
    messages: [...(system ? [{ role: "system", content: system }] : []), ...turns],
    stream: true,
    stream_options: { include_usage: true },
  };
  if (model) body.model = model;
  for (const id of ["temperature", "top_p", "top_k", "max_tokens", "seed"]) {
    const v = numberField(id);
    if (v !== undefined && !(id === "top_k" && v === 0)) body[id] = v;
  }
  return body;
}

function scrollToEnd() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

/** Add a message bubble; returns its parts (`text` is a Text node that replies append to). */
function addMessage(role, content) {
  $("empty-hint").hidden = true;
  const text = document.createTextNode(content);
  const label = { user: "You", assistant: "Model", error: "Error" }[role];
  const meta = el("div", { class: "meta" });
  const node = el("div", { class: `msg ${role}`, role: role === "error" ? "alert" : null },
    el("div", { class: "role" }, label), el("div", { class: "text" }, text), role === "assistant" ? meta : null);
  $("messages").append(node);
  scrollToEnd();
  return { node, text, meta };
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = el("textarea", {}, text);
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  if (!busy) $("prompt").focus();
}

/** Read the server-sent events of `resp`, calling `onChunk` with each parsed data object. */
async function readEvents(resp, onChunk) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data || data === "[DONE]") continue;
      let chunk;
      try { chunk = JSON.parse(data); } catch { throw new ApiCallError("the server sent an event that is not JSON", resp.status); }
      if (chunk.error) throw new ApiCallError(chunk.error.message || "the server reported an error", resp.status, chunk.error.code);
      onChunk(chunk);
    }
  }
}

async function send(prompt) {
  turns.push({ role: "user", content: prompt });
  addMessage("user", prompt);
  const reply = addMessage("assistant", "");
  reply.node.classList.add("streaming");
  controller = new AbortController();
  setBusy(true);
  let content = "", finish = null, usage = null, error = null, stopped = false;
  const started = performance.now();
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!resp.ok) throw await responseError(resp);
    await readEvents(resp, (chunk) => {
      for (const choice of chunk.choices || []) {
        if ((choice.index ?? 0) !== 0) continue;
        const piece = choice.delta?.content;
        if (piece) {
          reply.text.appendData(piece);
          content += piece;
          scrollToEnd();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      if (chunk.usage) usage = chunk.usage;
    });
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else error = e instanceof ApiCallError ? e : new ApiCallError(`the request failed (${e.message})`, 0);
  } finally {
    controller = null;
    reply.node.classList.remove("streaming");
    setBusy(false);
  }
  if (!error && !stopped && !finish) {
    error = new ApiCallError("the stream ended without a finish_reason, so this reply is incomplete "
      + "(the connection dropped or the server stopped)", 0, "incomplete_stream");
  }
  if (error) {
    turns.pop(); // the failed turn is not part of the conversation
    if (!content) reply.node.remove();
    addMessage("error", error.message);
    if (!$("prompt").value) $("prompt").value = prompt; // ready to retry
    return;
  }
  turns.push({ role: "assistant", content });
  const seconds = (performance.now() - started) / 1000;
  const facts = [];
  if (stopped) facts.push(el("span", { class: "note" }, "stopped"));
  if (finish === "length") facts.push(el("span", { class: "note" }, "cut at the token limit"));
  if (usage) facts.push(el("span", {}, `${usage.completion_tokens} tokens \u00b7 ${(usage.completion_tokens / seconds).toFixed(0)} tokens/s`));
  const button = el("button", { type: "button", class: "small copy", "aria-label": "Copy this reply" }, "Copy");
  button.addEventListener("click", () => copy(content, button));
  reply.meta.append(el("span", {}, ...facts.flatMap((f, i) => (i ? [" \u00b7 ", f] : [f]))), button);
}

function stop() {
  if (controller) controller.abort();
}

function clear() {
  stop();
  turns.length = 0;
  $("messages").replaceChildren($("empty-hint"));
  $("empty-hint").hidden = false;
  $("prompt").focus();
}

function submit() {
  const prompt = $("prompt").value.trim();
  if (!prompt || controller) return;
  $("prompt").value = "";
  $("prompt").style.height = "";
  send(prompt);
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); submit(); });
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    submit();
  }
});
$("prompt").addEventListener("input", () => {
  const area = $("prompt");
  area.style.height = "auto";
  area.style.height = `${Math.min(area.scrollHeight + 2, 160)}px`;
});
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && controller) stop(); });
$("stop").addEventListener("click", stop);
$("clear").addEventListener("click", clear);
if (window.matchMedia("(min-width: 761px)").matches) $("settings").open = true;
setupPage("chat", loadModel);
loadModel();
$("prompt").focus();
