// The request inspector's views: the list of kept requests and one request's steps, as
// GET /v1/inspector/requests[/{id}] describe them (glmserve/api/inspector.py).

import { h, pretty } from "./dom.js";

const ms = (v) => (v === null || v === undefined ? "–" : `${v < 10 ? v.toFixed(1) : Math.round(v)} ms`);
const time = (t) => new Date(t * 1000).toLocaleTimeString();
const statusClass = (s) => (s === "running" ? "running" : s >= 400 ? "bad" : "ok");

export function listView(data, open) {
  if (!data.data.length) {
    return h("p", { class: "muted" }, "No requests yet. Every request to the model shows here: from this page, the SDKs, Claude Code, Codex…");
  }
  const rows = data.data.map((e) => h("tr", { class: "entry-row", dataset: { id: e.id }, tabindex: 0,
    onclick: () => open(e.id), onkeydown: (ev) => { if (ev.key === "Enter") open(e.id); } },
  h("td", {}, time(e.created)),
  h("td", {}, h("span", { class: `status ${statusClass(e.status)}` }, String(e.status))),
  h("td", {}, e.api),
  h("td", { class: "clip" }, e.error ? h("span", { class: "bad" }, e.error)
    : [e.finish_reason ? String(e.finish_reason) : "", e.calls.length ? ` → ${e.calls.join(", ")}` : ""]),
  h("td", { class: "num" }, e.prompt_tokens ?? "–", " / ", e.completion_tokens ?? "–"),
  h("td", { class: "num" }, ms(e.duration_ms)),
  h("td", { class: "clip muted" }, e.user_agent)));
  return h("table", { class: "entries" },
    h("thead", {}, h("tr", {}, ["time", "status", "API", "outcome", "tokens in / out", "took", "client"].map((t) => h("th", {}, t)))),
    h("tbody", {}, rows));
}

function section(title, ...body) {
  return h("section", { class: "insp-section" }, h("h3", {}, title), ...body);
}

function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.filter(([, v]) => v !== undefined).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "–")]));
}

function promptView(prompt) {
  const pre = h("pre", { class: "prompt" });
  for (const p of prompt.parts) {
    if (p.control !== undefined) pre.append(h("mark", { class: "ctl", title: "control token" }, p.control));
    else if (p.left_out !== undefined) pre.append(h("span", { class: "left-out" }, p.left_out));
    else pre.append(p.text);
  }
  return pre;
}

function eventsView(events) {
  if (!events.length) return h("p", { class: "muted" }, "none");
  return h("ol", { class: "events" }, events.map((e) => {
    if (e.type === "text" || e.type === "reasoning") return h("li", {}, h("b", {}, e.type), " ", h("code", {}, JSON.stringify(e.text)));
    if (e.type === "call_start") return h("li", {}, h("b", {}, "call start"), ` #${e.call} `, h("code", {}, e.name));
    if (e.type === "call_arguments") return h("li", {}, h("b", {}, "arguments"), ` #${e.call} `, h("code", {}, e.arguments));
    return h("li", {}, h("b", {}, "call end"), ` #${e.call}`);
  }));
}

function callsView(calls) {
  if (!calls.length) return h("p", { class: "muted" }, "no calls");
  return calls.map((c) => h("div", { class: "call-card" },
    h("div", { class: "call-head" }, h("span", { class: "call-name" }, c.name), h("span", { class: "muted" }, c.id),
      h("span", { class: `badge ${c.valid ? "ok" : "bad"}` }, c.valid ? "valid against the schema" : c.problem)),
    h("pre", { class: "args" }, pretty(c.arguments))));
}

export function entryView(e) {
  const t = e.timings_ms || {};
  const c = e.constraint;
  const out = [
    h("div", { class: "insp-head" },
      h("h2", {}, e.api, " ", h("span", { class: `status ${statusClass(e.status)}` }, String(e.status))),
      kv([["entry", h("code", {}, e.id)], ["response id", e.request_id ? h("code", {}, e.request_id) : "–"],
        ["model", e.model], ["stream", e.stream === null ? "–" : String(e.stream)], ["client", e.user_agent || "–"],
        ["received", new Date(e.created * 1000).toLocaleString()]])),
  ];
  if (e.error) {
    out.push(section("Error", h("p", { class: "error-text" }, `${e.error.status}${e.error.in_band ? " (sent in the stream)" : ""}: ${e.error.message}`)));
  }
  out.push(section("Timings (from arrival)", kv([["queued (until preparing began)", ms(t.queued)], ["prepared", ms(t.prepared)],
    ["first token", ms(t.first_token)], ["done", ms(t.done)]])));
  if (e.tokens) {
    out.push(section("Tokens", kv([["prompt", e.tokens.prompt_tokens], ["cached (prefix cache)", e.tokens.cached_tokens ?? "–"],
      ["output", e.tokens.completion_tokens]])));
  }
  if (c) {
    out.push(section("Constraint", kv([["tool_choice", c.tool_choice], ["parallel_tool_calls", String(c.parallel_tool_calls)],
      ["tools", c.tools && c.tools.length ? c.tools.join(", ") : "–"], ["decoding held to", c.kind],
      ["grammar size", c.grammar_chars !== undefined ? `${c.grammar_chars} characters` : undefined],
      ["schema size", c.schema_chars !== undefined ? `${c.schema_chars} characters` : undefined],
      ["relaxed tools (schema not compilable)", c.relaxed_tools && c.relaxed_tools.length ? c.relaxed_tools.join(", ") : undefined],
      ["built", c.build_ms !== undefined ? (c.cache_hit ? `cache hit (${ms(c.build_ms)})` : `compiled in ${ms(c.build_ms)}`) : undefined]])));
  }
  if (e.params) {
    out.push(section("Generation", kv(Object.entries(e.params).map(([k, v]) => [k, v === null ? "–" : JSON.stringify(v)]))));
  }
  if (e.prompt) {
    out.push(section(`Rendered prompt (${e.prompt.chars} characters; control tokens marked)`, promptView(e.prompt)));
  }
  for (const ch of e.choices || []) {
    const label = e.choices.length > 1 ? ` (choice ${ch.index})` : "";
    out.push(section(`Raw model output${label}`, h("pre", { class: "raw" }, ch.raw || "(nothing)")));
    out.push(section(`Parsed events${label}`, eventsView(ch.events)));
    out.push(section(`Final calls${label} · finish reason ${ch.finish_reason ?? "–"}`, callsView(ch.calls || [])));
  }
  if (e.log_fields) out.push(section("Log fields", h("pre", {}, JSON.stringify(e.log_fields, null, 2))));
  if (e.request) {
    out.push(h("details", { class: "insp-section" }, h("summary", {}, "Request body"), h("pre", { class: "body" }, pretty(e.request.body))));
  }
  return h("div", { class: "entry" }, out);
}
