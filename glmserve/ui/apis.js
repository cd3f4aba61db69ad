// The three APIs the playground speaks, each as a client of it would: how a conversation and
// the settings become a request body, and how the server-sent events of its streamed answer
// become the page's own events:
//   {type: "id", id}                      the response's id (chatcmpl-…, msg_…, resp_…)
//   {type: "text" | "reasoning", text}
//   {type: "signature", signature}        (Messages: the thinking block's signature)
//   {type: "call_start", key, id, name}   key: the call's place in this answer
//   {type: "call_args", key, delta}
//   {type: "call_done", key, arguments}   the call's whole arguments, where the API repeats them
//   {type: "finish", reason, usage: {prompt, cached, completion}}
//   {type: "error", message}
//
// A conversation is a list of {role: "user", text} | {role: "assistant", text, reasoning,
// signature, calls: [{id, name, arguments}]} | {role: "tool", callId, name, text}.

export const APIS = {
  "chat.completions": { label: "Chat Completions", path: "/v1/chat/completions", body: chatBody, events: chatEvents },
  messages: { label: "Messages", path: "/v1/messages", body: messagesBody, events: messagesEvents },
  responses: { label: "Responses", path: "/v1/responses", body: responsesBody, events: responsesEvents },
};

const drop = (obj) => Object.fromEntries(Object.entries(obj).filter(([, v]) => v !== undefined));

function parseArgs(text) {
  try {
    const v = JSON.parse(text || "{}");
    return v && typeof v === "object" && !Array.isArray(v) ? v : {};
  } catch {
    return {};
  }
}

// ----------------------------------------------------------------------- Chat Completions

function chatBody(s) {
  const messages = s.system ? [{ role: "system", content: s.system }] : [];
  for (const m of s.conversation) {
    if (m.role === "user") messages.push({ role: "user", content: m.text });
    else if (m.role === "tool") messages.push({ role: "tool", tool_call_id: m.callId, content: m.text });
    else {
      messages.push(drop({
        role: "assistant",
        content: m.text || null,
        reasoning_content: m.reasoning || undefined,
        tool_calls: m.calls.length
          ? m.calls.map((c) => ({ id: c.id, type: "function", function: { name: c.name, arguments: c.arguments } }))
          : undefined,
      }));
    }
  }
  const tools = s.tools.length ? s.tools : undefined;
  let choice;
  if (tools) choice = s.toolChoice.startsWith("named:") ? { type: "function", function: { name: s.toolChoice.slice(6) } } : s.toolChoice;
  return drop({
    model: s.model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: s.maxTokens,
    temperature: s.temperature,
    tools,
    tool_choice: choice,
    parallel_tool_calls: tools ? s.parallel : undefined,
    chat_template_kwargs: s.caps.switch ? { enable_thinking: s.thinking } : undefined,
    thinking_budget: s.caps.budget && s.thinking && s.budget ? s.budget : undefined,
  });
}

function chatEvents(ev, emit, st) {
  if (ev.data === "[DONE]") return;
  const obj = JSON.parse(ev.data);
  if (obj.error) return emit({ type: "error", message: obj.error.message || JSON.stringify(obj.error) });
  if (obj.id && !st.id) emit({ type: "id", id: (st.id = obj.id) });
  const choice = (obj.choices || [])[0];
  if (choice) {
    const d = choice.delta || {};
    if (d.reasoning_content) emit({ type: "reasoning", text: d.reasoning_content });
    if (d.content) emit({ type: "text", text: d.content });
    for (const tc of d.tool_calls || []) {
      if (tc.id || (tc.function && tc.function.name)) emit({ type: "call_start", key: tc.index, id: tc.id, name: tc.function.name });
      if (tc.function && tc.function.arguments) emit({ type: "call_args", key: tc.index, delta: tc.function.arguments });
    }
    if (choice.finish_reason) st.reason = choice.finish_reason;
  }
  if (obj.usage) {
    const u = obj.usage;
    st.usage = { prompt: u.prompt_tokens, cached: (u.prompt_tokens_details || {}).cached_tokens, completion: u.completion_tokens };
  }
}

// ----------------------------------------------------------------------- Messages

function messagesBody(s) {
  const messages = [];
  const push = (role, blocks) => {
    const last = messages[messages.length - 1];
    if (last && last.role === role) last.content.push(...blocks);
    else messages.push({ role, content: blocks });
  };
  for (const m of s.conversation) {
    if (m.role === "user") push("user", [{ type: "text", text: m.text }]);
    else if (m.role === "tool") push("user", [{ type: "tool_result", tool_use_id: m.callId, content: m.text }]);
    else {
      const blocks = [];
      if (m.reasoning && m.signature) blocks.push({ type: "thinking", thinking: m.reasoning, signature: m.signature });
      if (m.text) blocks.push({ type: "text", text: m.text });
      for (const c of m.calls) blocks.push({ type: "tool_use", id: c.id, name: c.name, input: parseArgs(c.arguments) });
      if (blocks.length) push("assistant", blocks);
    }
  }
  const tools = s.tools.length
    ? s.tools.map((t) => drop({ name: t.function.name, description: t.function.description,
      input_schema: t.function.parameters || { type: "object" } }))
    : undefined;
  let choice;
  if (tools) {
    const serial = s.parallel ? undefined : true;
    if (s.toolChoice === "none") choice = { type: "none" };
    else if (s.toolChoice === "auto") choice = drop({ type: "auto", disable_parallel_tool_use: serial });
    else if (s.toolChoice === "required") choice = drop({ type: "any", disable_parallel_tool_use: serial });
    else choice = drop({ type: "tool", name: s.toolChoice.slice(6), disable_parallel_tool_use: serial });
  }
  let thinking;
  if (s.caps.switch || s.caps.budget) {
    if (!s.thinking && s.caps.switch) thinking = { type: "disabled" };
    else if (s.budget && s.caps.budget) thinking = { type: "enabled", budget_tokens: s.budget };
    else thinking = { type: "adaptive" };
  }
  return drop({
    model: s.model,
    system: s.system || undefined,
    messages,
    stream: true,
    max_tokens: s.maxTokens,
    temperature: s.temperature,
    tools,
    tool_choice: choice,
    thinking,
  });
}

const STOP = { tool_use: "tool_use", end_turn: "end_turn", max_tokens: "max_tokens", stop_sequence: "stop_sequence" };

function messagesEvents(ev, emit, st) {
  const obj = JSON.parse(ev.data);
  switch (obj.type) {
    case "message_start": {
      const m = obj.message;
      emit({ type: "id", id: (st.id = m.id) });
      st.usage = { prompt: m.usage.input_tokens + (m.usage.cache_read_input_tokens || 0),
        cached: m.usage.cache_read_input_tokens || 0, completion: m.usage.output_tokens };
      break;
    }
    case "content_block_start": {
      const b = obj.content_block;
      if (b.type === "tool_use") emit({ type: "call_start", key: obj.index, id: b.id, name: b.name });
      else if (b.type === "text" && b.text) emit({ type: "text", text: b.text });
      else if (b.type === "thinking" && b.thinking) emit({ type: "reasoning", text: b.thinking });
      break;
    }
    case "content_block_delta": {
      const d = obj.delta;
      if (d.type === "text_delta") emit({ type: "text", text: d.text });
      else if (d.type === "thinking_delta") emit({ type: "reasoning", text: d.thinking });
      else if (d.type === "signature_delta") emit({ type: "signature", signature: d.signature });
      else if (d.type === "input_json_delta") emit({ type: "call_args", key: obj.index, delta: d.partial_json });
      break;
    }
    case "message_delta":
      if (obj.delta && obj.delta.stop_reason) st.reason = STOP[obj.delta.stop_reason] || obj.delta.stop_reason;
      if (obj.usage && st.usage) st.usage.completion = obj.usage.output_tokens;
      break;
    case "error":
      emit({ type: "error", message: obj.error.message });
      break;
    default:
  }
}

// ----------------------------------------------------------------------- Responses

function responsesBody(s) {
  const input = [];
  for (const m of s.conversation) {
    if (m.role === "user") input.push({ role: "user", content: m.text });
    else if (m.role === "tool") input.push({ type: "function_call_output", call_id: m.callId, output: m.text });
    else {
      if (m.text) input.push({ role: "assistant", content: m.text });
      for (const c of m.calls) input.push({ type: "function_call", call_id: c.id, name: c.name, arguments: c.arguments });
    }
  }
  const tools = s.tools.length
    ? s.tools.map((t) => drop({ type: "function", name: t.function.name, description: t.function.description,
      parameters: t.function.parameters }))
    : undefined;
  let choice;
  if (tools) choice = s.toolChoice.startsWith("named:") ? { type: "function", name: s.toolChoice.slice(6) } : s.toolChoice;
  return drop({
    model: s.model,
    instructions: s.system || undefined,
    input,
    stream: true,
    store: false,
    max_output_tokens: s.maxTokens,
    temperature: s.temperature,
    tools,
    tool_choice: choice,
    parallel_tool_calls: tools ? s.parallel : undefined,
    reasoning: s.caps.switch && !s.thinking ? { effort: "none" } : undefined,
  });
}

function responsesEvents(ev, emit, st) {
  const obj = JSON.parse(ev.data);
  switch (obj.type) {
    case "response.created":
      emit({ type: "id", id: (st.id = obj.response.id) });
      break;
    case "response.output_item.added":
      if (obj.item.type === "function_call") emit({ type: "call_start", key: obj.output_index, id: obj.item.call_id, name: obj.item.name });
      break;
    case "response.output_text.delta":
      emit({ type: "text", text: obj.delta });
      break;
    case "response.reasoning_text.delta":
      emit({ type: "reasoning", text: obj.delta });
      break;
    case "response.function_call_arguments.delta":
      emit({ type: "call_args", key: obj.output_index, delta: obj.delta });
      break;
    case "response.function_call_arguments.done":
      emit({ type: "call_done", key: obj.output_index, arguments: obj.arguments });
      break;
    case "response.completed":
    case "response.incomplete": {
      const r = obj.response;
      st.reason = r.status === "incomplete" ? `incomplete: ${(r.incomplete_details || {}).reason || "?"}` : "completed";
      if (r.usage) st.usage = { prompt: r.usage.input_tokens, cached: (r.usage.input_tokens_details || {}).cached_tokens, completion: r.usage.output_tokens };
      break;
    }
    case "response.failed":
      emit({ type: "error", message: ((obj.response || {}).error || {}).message || "the response failed" });
      break;
    case "error":
      emit({ type: "error", message: obj.message || (obj.error || {}).message || "error" });
      break;
    default:
  }
}

// ----------------------------------------------------------------------- the stream

/** Server-sent events of a fetch() response: yields {event, data}. */
export async function* sse(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

/** Send the conversation on ``api``; calls ``on(event)`` as the answer streams in. Returns
 * {status, inspectId} once done (errors are events). */
export async function send(api, settings, { key, signal, on }) {
  const spec = APIS[api];
  const headers = { "Content-Type": "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(spec.path, { method: "POST", headers, body: JSON.stringify(spec.body(settings)), signal });
  const inspectId = response.headers.get("X-Request-Id");
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const obj = await response.json();
      message = `${response.status}: ${(obj.error && obj.error.message) || obj.detail || JSON.stringify(obj)}`;
    } catch { /* not JSON: the status says it */ }
    on({ type: "error", message });
    return { status: response.status, inspectId };
  }
  const st = { id: null, reason: null, usage: null };
  for await (const ev of sse(response)) spec.events(ev, on, st);
  on({ type: "finish", reason: st.reason, usage: st.usage });
  return { status: response.status, inspectId };
}
