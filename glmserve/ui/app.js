// The playground: settings, the conversation, tool-call cards, and the request inspector.

import { $, h, pretty } from "./dom.js";
import { APIS, send } from "./apis.js";
import { EXAMPLES } from "./examples.js";
import { entryView, listView } from "./inspect.js";

const KEY = "glmserve.key";
const state = { info: null, conversation: [], tools: [], busy: null };

const key = () => sessionStorage.getItem(KEY) || "";

function authed(path, opts = {}) {
  const headers = { ...(opts.headers || {}) };
  if (key()) headers.Authorization = `Bearer ${key()}`;
  return fetch(path, { ...opts, headers });
}

// ----------------------------------------------------------------------- settings

function parseTools(text) {
  if (!text.trim()) return [];
  const value = JSON.parse(text);
  const list = Array.isArray(value) ? value : [value];
  return list.map((t, i) => {
    if (!t || typeof t !== "object") throw new Error(`tool ${i + 1} is not an object`);
    // OpenAI Chat Completions' shape; Messages' (input_schema) and Responses' flat one are taken too
    const f = t.function || t;
    if (typeof f.name !== "string" || !f.name) throw new Error(`tool ${i + 1} has no name`);
    const parameters = f.parameters || f.input_schema;
    return { type: "function", function: { name: f.name, description: f.description, parameters } };
  });
}

function onToolsChange() {
  const status = $("#tools-status");
  try {
    state.tools = parseTools($("#tools").value);
    status.textContent = state.tools.length
      ? `${state.tools.length} tool${state.tools.length > 1 ? "s" : ""}: ${state.tools.map((t) => t.function.name).join(", ")}`
      : "no tools";
    status.className = "muted";
    state.toolsError = null;
  } catch (err) {
    state.toolsError = `Tools: ${err.message}`;
    status.textContent = state.toolsError;
    status.className = "bad";
  }
  const select = $("#tool-choice");
  const before = select.value || "auto";
  select.replaceChildren(...["none", "auto", "required"].map((v) => h("option", { value: v }, v)),
    ...state.tools.map((t) => h("option", { value: `named:${t.function.name}` }, `named: ${t.function.name}`)));
  select.value = [...select.options].some((o) => o.value === before) ? before : "auto";
}

function loadExample(id) {
  const ex = EXAMPLES.find((e) => e.id === id);
  if (!ex) return;
  $("#tools").value = JSON.stringify(ex.tools, null, 2);
  onToolsChange();
  if (!$("#input").value.trim()) $("#input").value = ex.message;
}

function onApiChange() {
  const caps = state.info.thinking;
  const api = $("#api").value;
  const noBudget = api === "responses";
  $("#budget").disabled = noBudget || !caps.budget;
  $("#thinking-note").textContent = noBudget && caps.budget ? "The Responses API has no thinking budget." : "";
}

function settings() {
  const num = (id) => {
    const v = $(id).value.trim();
    return v === "" ? undefined : Number(v);
  };
  return {
    model: $("#model").value || undefined,
    system: $("#system").value.trim(),
    tools: state.tools,
    toolChoice: $("#tool-choice").value,
    parallel: $("#parallel").checked,
    caps: state.info.thinking,
    thinking: $("#thinking").checked,
    budget: $("#budget").disabled ? undefined : num("#budget"),
    maxTokens: num("#max-tokens"),
    temperature: num("#temperature"),
  };
}

// ----------------------------------------------------------------------- the conversation

const log = () => $("#log");

function scrollDown() {
  const el = log();
  el.scrollTop = el.scrollHeight;
}

function userBubble(text) {
  log().append(h("div", { class: "turn user" }, h("div", { class: "bubble" }, text)));
  scrollDown();
}

function toolBubble(name, text) {
  log().append(h("div", { class: "turn tool" }, h("div", { class: "bubble" }, h("span", { class: "muted" }, `result of ${name}: `), text)));
}

/** One assistant answer: its DOM, filled in as events arrive, and the message it becomes. */
class Turn {
  constructor(api) {
    this.api = api;
    this.message = { role: "assistant", text: "", reasoning: "", signature: "", calls: [] };
    this.calls = new Map();
    this.reasoningText = h("div", { class: "reasoning-text" });
    this.reasoning = h("details", { class: "reasoning", open: true, hidden: true }, h("summary", {}, "Reasoning"), this.reasoningText);
    this.text = h("div", { class: "text" });
    this.cards = h("div", { class: "calls" });
    this.foot = h("div", { class: "foot muted" }, h("span", { class: "spinner" }, "generating…"));
    this.el = h("div", { class: "turn assistant" }, h("div", { class: "api-tag muted" }, APIS[api].label),
      this.reasoning, this.text, this.cards, this.foot);
    log().append(this.el);
    this.error = null;
  }

  apply(ev) {
    const m = this.message;
    if (ev.type === "id") this.responseId = ev.id;
    else if (ev.type === "text") {
      m.text += ev.text;
      this.text.textContent = m.text;
    } else if (ev.type === "reasoning") {
      m.reasoning += ev.text;
      this.reasoning.hidden = false;
      this.reasoningText.textContent = m.reasoning;
    } else if (ev.type === "signature") m.signature += ev.signature;
    else if (ev.type === "call_start") {
      const call = { id: ev.id, name: ev.name, arguments: "" };
      const pre = h("pre", { class: "args" });
      const badge = h("span", { class: "badge" }, "…");
      const card = h("div", { class: "call-card" },
        h("div", { class: "call-head" }, h("span", { class: "call-name" }, ev.name), h("span", { class: "muted call-id" }, ev.id || ""), badge),
        pre);
      this.calls.set(ev.key, { call, pre, badge, card });
      m.calls.push(call);
      this.cards.append(card);
    } else if (ev.type === "call_args" || ev.type === "call_done") {
      const c = this.calls.get(ev.key);
      if (!c) return;
      c.call.arguments = ev.type === "call_done" ? ev.arguments : c.call.arguments + ev.delta;
      c.pre.textContent = c.call.arguments;
    } else if (ev.type === "finish") {
      this.reason = ev.reason;
      this.usage = ev.usage;
    } else if (ev.type === "error") {
      this.error = ev.message;
      this.el.append(h("p", { class: "error-text" }, ev.message));
    }
    scrollDown();
  }

  async finish(inspectId, stopped) {
    this.reasoning.open = false;
    const u = this.usage;
    const bits = [];
    if (stopped) bits.push("stopped");
    if (this.reason) bits.push(h("span", { class: "finish" }, this.reason));
    if (u) bits.push(`prompt ${u.prompt ?? "?"}${u.cached ? ` (${u.cached} cached)` : ""} · output ${u.completion ?? "?"} tokens`);
    if (this.responseId) bits.push(h("code", {}, this.responseId));
    if (inspectId) bits.push(h("a", { class: "inspect-link", href: `#inspector/${inspectId}` }, "Inspect"));
    this.foot.replaceChildren(...bits.flatMap((b, i) => (i ? [" · ", b] : [b])));
    const cut = /length|max_tokens|incomplete/.test(this.reason || "");
    await Promise.all([...this.calls.values()].map((c) => this.check(c, cut)));
  }

  async check(c, cut) {
    c.pre.textContent = pretty(c.call.arguments);
    const tool = state.tools.find((t) => t.function.name === c.call.name);
    const schema = tool ? tool.function.parameters || null : null;
    let verdict;
    try {
      const r = await authed("/v1/ui/validate", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ schema, arguments: c.call.arguments }) });
      verdict = r.ok ? await r.json() : { valid: null, errors: [`the check failed (${r.status})`] };
    } catch (err) {
      verdict = { valid: null, errors: [String(err)] };
    }
    if (!tool) verdict = { valid: false, errors: ["no tool of this name is declared"] };
    c.badge.className = `badge ${verdict.valid ? "ok" : verdict.valid === false ? "bad" : "warn"}`;
    c.badge.textContent = verdict.valid ? "✓ valid against the schema" : `✗ ${cut ? "cut by the token limit; " : ""}${verdict.errors.join("; ")}`;
    c.card.dataset.valid = String(verdict.valid);
  }

  /** Boxes for the tool results, and the button that sends them. */
  askResults() {
    const entries = [...this.calls.values()];
    if (!entries.length) return;
    const inputs = entries.map((c) => {
      const input = h("textarea", { class: "result-input", rows: 2, placeholder: `Result of ${c.call.name} (e.g. {"temperature": 21})`,
        "aria-label": `Result of ${c.call.name}` });
      input.addEventListener("keydown", (ev) => {
        if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
          ev.preventDefault();
          button.click();
        }
      });
      c.card.append(h("label", { class: "result" }, "Tool result", input));
      return input;
    });
    const button = h("button", { class: "send-results", type: "button" }, entries.length > 1 ? "Send results" : "Send result");
    button.addEventListener("click", () => {
      if (state.busy) return;
      if (inputs.some((i) => !i.value.trim())) {
        inputs.find((i) => !i.value.trim()).focus();
        return;
      }
      inputs.forEach((i) => { i.disabled = true; });
      button.remove();
      entries.forEach((c, k) => {
        state.conversation.push({ role: "tool", callId: c.call.id, name: c.call.name, text: inputs[k].value.trim() });
        toolBubble(c.call.name, inputs[k].value.trim());
      });
      const choice = $("#tool-choice");
      if (choice.value === "required" || choice.value.startsWith("named:")) {
        // as agent SDKs do after a call: a forced choice would only call again
        $("#choice-note").hidden = false;
        $("#choice-note").textContent = `tool_choice went back from ${choice.value} to auto after the call, so the model can answer.`;
        choice.value = "auto";
      }
      run();
    });
    this.cards.append(button);
    inputs[0].focus();
  }
}

async function run() {
  if (state.toolsError) {
    log().append(h("p", { class: "error-text" }, state.toolsError));
    return;
  }
  const api = $("#api").value;
  const turn = new Turn(api);
  const controller = new AbortController();
  setBusy(controller);
  let result = { inspectId: null };
  let stopped = false;
  try {
    result = await send(api, { ...settings(), conversation: state.conversation }, { key: key(), signal: controller.signal, on: (ev) => turn.apply(ev) });
  } catch (err) {
    if (err.name === "AbortError") stopped = true;
    else turn.apply({ type: "error", message: String(err) });
  } finally {
    setBusy(null);
  }
  if (!turn.error && !stopped) state.conversation.push(turn.message);
  await turn.finish(result.inspectId, stopped);
  if (!turn.error && !stopped) turn.askResults();
  if (result.status === 401) askKey();
}

function setBusy(controller) {
  state.busy = controller;
  const b = $("#send");
  b.textContent = controller ? "Stop" : "Send";
  b.classList.toggle("stop", !!controller);
}

function submit(ev) {
  if (ev) ev.preventDefault();
  if (state.busy) {
    state.busy.abort();
    return;
  }
  const text = $("#input").value.trim();
  if (!text) return;
  $("#input").value = "";
  state.conversation.push({ role: "user", text });
  userBubble(text);
  run();
}

function newChat() {
  if (state.busy) state.busy.abort();
  state.conversation = [];
  log().replaceChildren();
  $("#choice-note").hidden = true;
}

// ----------------------------------------------------------------------- key and models

function askKey() {
  $("#key-row").hidden = false;
  document.body.classList.add("settings-open");
  $("#toggle-settings").setAttribute("aria-expanded", "true");
  $("#api-key").focus();
}

async function loadModels() {
  const select = $("#model");
  try {
    const r = await authed("/v1/models");
    if (r.status === 401) {
      $("#model-badge").textContent = "API key needed";
      askKey();
      return;
    }
    const data = await r.json();
    select.replaceChildren(...data.data.map((m) => h("option", { value: m.id }, m.id)));
    $("#model-badge").textContent = data.data.length ? data.data[0].id : "no model";
  } catch (err) {
    $("#model-badge").textContent = `cannot list models: ${err}`;
  }
}

// ----------------------------------------------------------------------- the inspector

async function showInspector(id) {
  const pane = $("#inspector");
  const body = $("#insp-body");
  pane.hidden = false;
  document.body.classList.add("inspecting");
  $("#insp-back").hidden = !id;
  body.replaceChildren(h("p", { class: "muted" }, "loading…"));
  try {
    const r = await authed(id ? `/v1/inspector/requests/${encodeURIComponent(id)}` : "/v1/inspector/requests");
    const data = await r.json();
    if (!r.ok) {
      body.replaceChildren(h("p", { class: "error-text" }, (data.error && data.error.message) || `${r.status}`));
      return;
    }
    body.replaceChildren(id ? entryView(data) : listView(data, (entry) => { location.hash = `#inspector/${entry}`; }));
    body.scrollTop = 0;
  } catch (err) {
    body.replaceChildren(h("p", { class: "error-text" }, String(err)));
  }
}

function hideInspector() {
  $("#inspector").hidden = true;
  document.body.classList.remove("inspecting");
}

function route() {
  const m = location.hash.match(/^#inspector(?:\/(.+))?$/);
  if (m) showInspector(m[1] ? decodeURIComponent(m[1]) : null);
  else hideInspector();
}

// ----------------------------------------------------------------------- start

async function start() {
  state.info = await (await fetch("/ui/info")).json();
  const info = state.info;
  $("#format-badge").textContent = `format ${info.chat_format}`;
  $("#api").replaceChildren(...Object.entries(APIS).map(([id, a]) => h("option", { value: id }, a.label)));
  $("#example").replaceChildren(h("option", { value: "" }, "— load an example —"),
    ...EXAMPLES.map((e) => h("option", { value: e.id }, e.label)));
  $("#key-row").hidden = !info.auth;
  $("#api-key").value = key();
  $("#thinking-box").hidden = !info.thinking.reasoning || !(info.thinking.switch || info.thinking.budget);
  $("#thinking-row").hidden = !info.thinking.switch;
  $("#budget-row").hidden = !info.thinking.budget;
  $("#open-inspector").hidden = !info.inspect;
  $("#inspect-off").hidden = !!info.inspect;

  $("#api").addEventListener("change", onApiChange);
  $("#tools").addEventListener("input", onToolsChange);
  $("#example").addEventListener("change", (ev) => { loadExample(ev.target.value); ev.target.value = ""; });
  $("#api-key").addEventListener("change", (ev) => {
    sessionStorage.setItem(KEY, ev.target.value.trim());
    loadModels();
  });
  $("#composer").addEventListener("submit", submit);
  $("#input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) submit(ev);
  });
  $("#new-chat").addEventListener("click", newChat);
  const toggle = (open) => {
    document.body.classList.toggle("settings-open", open);
    $("#toggle-settings").setAttribute("aria-expanded", String(document.body.classList.contains("settings-open")));
  };
  $("#toggle-settings").addEventListener("click", () => toggle());
  $("#close-settings").addEventListener("click", () => toggle(false));
  $("#open-inspector").addEventListener("click", () => { location.hash = "#inspector"; });
  $("#insp-back").addEventListener("click", () => { location.hash = "#inspector"; });
  $("#insp-refresh").addEventListener("click", route);
  $("#insp-close").addEventListener("click", () => { history.pushState("", document.title, location.pathname); hideInspector(); });
  window.addEventListener("hashchange", route);

  loadExample("weather");
  onApiChange();
  if (info.auth && !key()) {
    $("#model-badge").textContent = "API key needed";
    askKey();
  } else await loadModels();
  route();
  document.body.dataset.ready = "true";
}

start();
