"""The agent workload: multi-turn tool-using conversations with a long, fixed prefix.

What a coding agent sends: a ~15K-token system prompt and ~20 tool definitions on *every* turn,
then the history, which grows by one tool call and its result per turn. What decides its speed is
the time to first token of turn N, which the prefix cache should make a small fraction of turn 1's,
and the server's own work per request on a long prompt (render, tokenize, constraint).

Everything is synthesised and deterministic, so glmserve and vLLM prefill the same tokens:

* the system prompt (``system_prompt``) is seeded English prose of about ``--agent-system-tokens``
  tokens, headed by a per-conversation session line -- conversations (and levels, and the
  warm-up) never share a prefix, so turn 1 is always a cold prefill and turn N's speed-up is the
  conversation's own cache;
* 20 tools (``AGENT_TOOLS``) with realistic schemas (enums, arrays, nested objects, bounds);
* turn k's history holds turns 1..k-1 as an assistant tool call with fixed arguments and a
  ~650-token tool result (``history_step``) -- whatever the model answered is not fed back.

Each turn is one streamed request with ``tool_choice: "auto"``, temperature 0 and
``max_tokens = --output-tokens``. Three workloads share the conversation: ``agent`` (Chat
Completions, both servers -- vLLM started with glmserve's tool-parser plugin and tools-aware template
via ``--vllm-tool-parser glmserve-glm4``), ``agent-messages`` (Anthropic Messages) and
``agent-responses`` (OpenAI Responses), the last two glmserve only. Per level (``c`` conversations
at once, each ``--agent-turns`` turns in order) the summary gains ``agent``: TTFT and prompt tokens
per turn and glmserve's own time per request from ``glmserve_server_time_seconds`` (per turn at
concurrency 1, where the metric can be read between turns).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any, Callable

from glmserve.bench.stats import RequestResult, percentile
from glmserve.bench.workload import LevelSpec, Workload

ENDPOINTS = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "responses": "/v1/responses"}
DEFAULT_SYSTEM_TOKENS = 15_000
DEFAULT_TURNS = 4

# --------------------------------------------------------------------------- tools


def _fn(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


_S: dict[str, Any] = {"type": "string"}
_PATH = {"type": "string", "description": "Path relative to the repository root."}
AGENT_TOOLS: list[dict[str, Any]] = [
    _fn("read_file", "Read a file from the repository. Long files are returned in pages.",
        {"path": _PATH, "offset": {"type": "integer", "minimum": 0, "description": "First line (0-based)."},
         "limit": {"type": "integer", "minimum": 1, "maximum": 2000, "description": "Number of lines."}}, ["path"]),
    _fn("write_file", "Create or overwrite a file with the given content.",
        {"path": _PATH, "content": {"type": "string", "description": "The full new content."}}, ["path", "content"]),
    _fn("edit_file", "Replace an exact string in a file. The old string must occur exactly once unless replace_all.",
        {"path": _PATH, "old_string": _S, "new_string": _S, "replace_all": {"type": "boolean"}},
        ["path", "old_string", "new_string"]),
    _fn("list_directory", "List the entries of a directory.",
        {"path": _PATH, "depth": {"type": "integer", "minimum": 1, "maximum": 5},
         "include_hidden": {"type": "boolean"}}, ["path"]),
    _fn("glob", "Find files whose path matches a glob pattern, newest first.",
        {"pattern": {"type": "string", "description": "e.g. src/**/*.py"}, "path": _PATH}, ["pattern"]),
    _fn("grep", "Search file contents with a regular expression (ripgrep syntax).",
        {"pattern": _S, "path": _PATH, "glob": _S,
         "output_mode": {"type": "string", "enum": ["content", "files_with_matches", "count"]},
         "context_lines": {"type": "integer", "minimum": 0, "maximum": 20},
         "case_insensitive": {"type": "boolean"}}, ["pattern"]),
    _fn("bash", "Run a shell command in the repository and return its output.",
        {"command": _S, "timeout_ms": {"type": "integer", "minimum": 1000, "maximum": 600000},
         "description": {"type": "string", "description": "Five to ten words saying what the command does."},
         "run_in_background": {"type": "boolean"}}, ["command"]),
    _fn("run_tests", "Run the test suite or a subset of it.",
        {"paths": {"type": "array", "items": _S}, "keyword": _S, "fail_fast": {"type": "boolean"},
         "verbosity": {"type": "string", "enum": ["quiet", "normal", "verbose"]}}, []),
    _fn("git_status", "Show the working tree status.", {"short": {"type": "boolean"}}, []),
    _fn("git_diff", "Show changes between commits, the index and the working tree.",
        {"ref": _S, "paths": {"type": "array", "items": _S}, "staged": {"type": "boolean"},
         "stat_only": {"type": "boolean"}}, []),
    _fn("git_commit", "Commit the staged changes.",
        {"message": _S, "paths": {"type": "array", "items": _S}, "amend": {"type": "boolean"}}, ["message"]),
    _fn("web_fetch", "Fetch a URL and return its content as markdown.",
        {"url": {"type": "string", "format": "uri"}, "prompt": _S, "max_chars": {"type": "integer", "minimum": 100}},
        ["url"]),
    _fn("web_search", "Search the web.",
        {"query": _S, "allowed_domains": {"type": "array", "items": _S},
         "max_results": {"type": "integer", "minimum": 1, "maximum": 20}}, ["query"]),
    _fn("todo_write", "Replace the task list shown to the user.",
        {"todos": {"type": "array", "items": {"type": "object", "properties": {
            "content": _S, "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]},
            "priority": {"type": "string", "enum": ["low", "medium", "high"]}},
            "required": ["content", "status"]}}}, ["todos"]),
    _fn("ask_user", "Ask the user a question and wait for the answer.",
        {"question": _S, "options": {"type": "array", "items": _S, "maxItems": 4}}, ["question"]),
    _fn("create_pull_request", "Open a pull request from the current branch.",
        {"title": _S, "body": _S, "base": _S, "draft": {"type": "boolean"},
         "reviewers": {"type": "array", "items": _S}}, ["title", "body"]),
    _fn("http_request", "Send an HTTP request to a service the project runs locally.",
        {"method": {"type": "string", "enum": ["GET", "POST", "PUT", "PATCH", "DELETE"]},
         "url": _S, "headers": {"type": "object", "additionalProperties": _S}, "body": _S}, ["method", "url"]),
    _fn("sql_query", "Run a read-only SQL query against the development database.",
        {"query": _S, "database": {"type": "string", "enum": ["app", "analytics"]},
         "row_limit": {"type": "integer", "minimum": 1, "maximum": 1000}}, ["query"]),
    _fn("notebook_edit", "Replace, insert or delete a cell of a Jupyter notebook.",
        {"path": _PATH, "cell_index": {"type": "integer", "minimum": 0}, "source": _S,
         "cell_type": {"type": "string", "enum": ["code", "markdown"]},
         "mode": {"type": "string", "enum": ["replace", "insert", "delete"]}}, ["path", "cell_index"]),
    _fn("spawn_subagent", "Start a sub-agent on a self-contained task and return its final report.",
        {"description": _S, "prompt": _S,
         "agent_type": {"type": "string", "enum": ["general", "explore", "review"]}}, ["description", "prompt"]),
]

# --------------------------------------------------------------------------- the conversation

_WORDS = ("the agent must always read a file before editing it and keep changes small focused and tested "
          "when a command fails report the exact error output and propose the next step instead of guessing "
          "prefer the repository's existing helpers over new code follow the style of the surrounding module "
          "never commit secrets credentials or large generated files ask the user before destructive operations "
          "such as deleting branches rewriting history or dropping database tables summarise what changed and why "
          "run the relevant tests after every change and include their result in the final answer use absolute "
          "paths in tool calls quote shell arguments that contain spaces and keep command output short").split()


def system_prompt(target_tokens: int, session: str, count: Callable[[str], int] | None = None) -> str:
    """Seeded prose of about ``target_tokens`` tokens (the model's tokenizer if ``count``, else
    ~1.3 tokens a word), headed by ``session`` so no two conversations share a prefix."""
    rng = random.Random(1234)
    head = f"Session {session}. You are a coding agent working in a software repository. Guidelines follow.\n\n"
    paras: list[str] = []
    total = count(head) if count else 20
    i = 0
    while total < target_tokens:
        i += 1
        words = [rng.choice(_WORDS) for _ in range(rng.randint(40, 90))]
        para = f"{i}. " + " ".join(words).capitalize() + "."
        total += count(para + "\n\n") if count else int(len(words) * 1.3) + 2
        paras.append(para)
    return head + "\n\n".join(paras)


_ARGS: dict[str, Callable[[int], dict[str, Any]]] = {
    "read_file": lambda k: {"path": f"src/module_{k}.py", "limit": 200},
    "write_file": lambda k: {"path": f"src/new_{k}.py", "content": f"VALUE = {k}\n"},
    "edit_file": lambda k: {"path": f"src/module_{k}.py", "old_string": f"return {k}", "new_string": f"return {k + 1}"},
    "list_directory": lambda k: {"path": f"src/pkg_{k}", "depth": 2},
    "glob": lambda k: {"pattern": f"src/**/test_{k}*.py"},
    "grep": lambda k: {"pattern": f"def handler_{k}", "output_mode": "content", "context_lines": 2},
    "bash": lambda k: {"command": f"python -m pytest -q tests/test_{k}.py", "description": "run the failing tests"},
    "run_tests": lambda k: {"paths": [f"tests/test_{k}.py"], "fail_fast": True},
    "git_status": lambda k: {"short": True},
    "git_diff": lambda k: {"paths": [f"src/module_{k}.py"], "stat_only": False},
    "git_commit": lambda k: {"message": f"Fix step {k}", "paths": [f"src/module_{k}.py"]},
    "web_fetch": lambda k: {"url": f"https://docs.python.org/3/library/item{k}.html"},
    "web_search": lambda k: {"query": f"python error code {k}", "max_results": 5},
    "todo_write": lambda k: {"todos": [{"content": f"step {k}", "status": "in_progress"}]},
    "ask_user": lambda k: {"question": f"Keep the behaviour of step {k}?", "options": ["yes", "no"]},
    "create_pull_request": lambda k: {"title": f"Fix {k}", "body": "Fixes the failing tests."},
    "http_request": lambda k: {"method": "GET", "url": f"http://127.0.0.1:8080/items/{k}"},
    "sql_query": lambda k: {"query": f"SELECT * FROM items WHERE id = {k}", "row_limit": 10},
    "notebook_edit": lambda k: {"path": f"nb/analysis_{k}.ipynb", "cell_index": k, "source": "print(1)"},
    "spawn_subagent": lambda k: {"description": f"explore step {k}", "prompt": f"Find where step {k} is handled."},
}


RESULT_LINES = 24


def history_step(k: int, lines: int = RESULT_LINES) -> tuple[str, dict[str, Any], str]:
    """Turn ``k``'s tool call ``(name, arguments)`` and its result (``lines`` lines of ~27 tokens:
    ~650 tokens by default), fixed."""
    name = AGENT_TOOLS[(3 * k) % len(AGENT_TOOLS)]["function"]["name"]
    out = [f"{n:4d}  def handler_{k}_{n}(request, context):  # returns the value of step {k}.{n}" for n in range(1, lines + 1)]
    return name, _ARGS[name](k), "\n".join(out)


def chat_payload(model: str, system: str, task: str, turns: int, max_tokens: int, temperature: float,
                 result_lines: int = RESULT_LINES) -> dict[str, Any]:
    """Chat Completions request of turn ``turns + 1`` (``turns`` steps of history)."""
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}, {"role": "user", "content": task}]
    for k in range(turns):
        name, args, result = history_step(k, result_lines)
        cid = f"call_{k}"
        msgs.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]})
        msgs.append({"role": "tool", "tool_call_id": cid, "content": result})
    return {"model": model, "messages": msgs, "tools": AGENT_TOOLS, "tool_choice": "auto", "max_tokens": max_tokens,
            "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}


def messages_payload(model: str, system: str, task: str, turns: int, max_tokens: int, temperature: float,
                     result_lines: int = RESULT_LINES) -> dict[str, Any]:
    """The same turn as an Anthropic Messages request."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": task}]
    for k in range(turns):
        name, args, result = history_step(k, result_lines)
        msgs.append({"role": "assistant", "content": [{"type": "tool_use", "id": f"toolu_{k}", "name": name, "input": args}]})
        msgs.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{k}", "content": result}]})
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in AGENT_TOOLS]
    return {"model": model, "system": system, "messages": msgs, "tools": tools, "tool_choice": {"type": "auto"},
            "max_tokens": max_tokens, "temperature": temperature, "stream": True}


def responses_payload(model: str, system: str, task: str, turns: int, max_tokens: int, temperature: float,
                      result_lines: int = RESULT_LINES) -> dict[str, Any]:
    """The same turn as an OpenAI Responses request (stateless: the history is resent, nothing stored)."""
    items: list[dict[str, Any]] = [{"role": "user", "content": task}]
    for k in range(turns):
        name, args, result = history_step(k, result_lines)
        items.append({"type": "function_call", "call_id": f"call_{k}", "name": name, "arguments": json.dumps(args)})
        items.append({"type": "function_call_output", "call_id": f"call_{k}", "output": result})
    tools = [{"type": "function", **t["function"]} for t in AGENT_TOOLS]
    return {"model": model, "instructions": system, "input": items, "tools": tools, "tool_choice": "auto",
            "max_output_tokens": max_tokens, "temperature": temperature, "stream": True, "store": False}


PAYLOADS = {"chat": chat_payload, "messages": messages_payload, "responses": responses_payload}

# --------------------------------------------------------------------------- streaming client


def _chat_event(obj: dict[str, Any], res: RequestResult) -> bool:
    gen = False
    for ch in obj.get("choices") or []:
        d = ch.get("delta") or {}
        tc = bool(d.get("tool_calls"))
        gen = gen or tc or bool(d.get("content")) or bool(d.get("reasoning_content")) or bool(d.get("reasoning"))
        res.tool_calls = res.tool_calls or tc
        if ch.get("finish_reason"):
            res.finish_reason = ch["finish_reason"]
    if obj.get("usage"):
        res.prompt_tokens = obj["usage"].get("prompt_tokens")
        res.completion_tokens = obj["usage"].get("completion_tokens")
        res.cached_tokens = (obj["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
    return gen


def _messages_event(obj: dict[str, Any], res: RequestResult) -> bool:
    t = obj.get("type")
    if t == "message_start":
        # Anthropic's input_tokens leave out the cache's share: the prompt is all three together
        u = (obj.get("message") or {}).get("usage") or {}
        res.cached_tokens = u.get("cache_read_input_tokens") or 0
        res.prompt_tokens = (u.get("input_tokens") or 0) + res.cached_tokens + (u.get("cache_creation_input_tokens") or 0)
    elif t == "message_delta":
        res.completion_tokens = (obj.get("usage") or {}).get("output_tokens")
        res.finish_reason = (obj.get("delta") or {}).get("stop_reason")
    elif t == "content_block_start" and (obj.get("content_block") or {}).get("type") == "tool_use":
        res.tool_calls = True
        return True
    return t == "content_block_delta"


def _responses_event(obj: dict[str, Any], res: RequestResult) -> bool:
    t = str(obj.get("type"))
    if t in ("response.completed", "response.incomplete"):
        r = obj.get("response") or {}
        usage = r.get("usage") or {}
        res.prompt_tokens, res.completion_tokens = usage.get("input_tokens"), usage.get("output_tokens")
        res.cached_tokens = (usage.get("input_tokens_details") or {}).get("cached_tokens")
        res.finish_reason = r.get("status")
    if t == "response.output_item.added" and (obj.get("item") or {}).get("type") == "function_call":
        res.tool_calls = True
        return True
    return t.endswith(".delta")


_HANDLERS = {"chat": _chat_event, "messages": _messages_event, "responses": _responses_event}
_DONE = {"chat": (), "messages": ("message_stop",), "responses": ("response.completed", "response.incomplete")}


async def stream_turn(client: Any, url: str, endpoint: str, payload: dict[str, Any], timeout: float,
                      headers: dict[str, str] | None = None) -> RequestResult:
    """One streamed request to ``endpoint``; TTFT is the first event carrying generated output."""
    start = time.perf_counter()
    res = RequestResult(ok=False, start=start, end=start)
    handle = _HANDLERS[endpoint]

    async def go() -> None:
        async with client.stream("POST", url + ENDPOINTS[endpoint], json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    res.ok = True
                    return
                now = time.perf_counter()
                obj = json.loads(data)
                if obj.get("error") or obj.get("type") in ("error", "response.failed"):
                    res.error = f"stream error: {data[:300]}"
                    return
                if handle(obj, res):
                    res.first_chunk = res.first_chunk or now
                    res.last_chunk = now
                    res.content_chunks += 1
                if obj.get("type") in _DONE[endpoint]:
                    res.ok = True
                    return
            res.error = "stream ended before its end event"

    try:
        await asyncio.wait_for(go(), timeout)
    except asyncio.TimeoutError:
        res.ok, res.error = False, f"timeout after {timeout:.0f} s"
    except Exception as exc:  # network errors, bad JSON: recorded, never raised
        res.ok, res.error = False, f"{type(exc).__name__}: {exc}"[:300]
    res.finish(time.perf_counter())
    return res


# --------------------------------------------------------------------------- server time


async def server_time(client: Any, url: str) -> dict[str, tuple[float, float]] | None:
    """``{phase: (sum seconds, count)}`` of ``glmserve_server_time_seconds``; None where the
    server does not export it (vLLM)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = await client.get(url + "/metrics")
    except Exception:  # no metrics endpoint: nothing to report
        return None
    if r.status_code != 200:
        return None
    out: dict[str, list[float]] = {}
    for fam in text_string_to_metric_families(r.text):
        if fam.name != "glmserve_server_time_seconds":
            continue
        for s in fam.samples:
            phase = s.labels.get("phase")
            if phase and s.name.endswith("_sum"):
                out.setdefault(phase, [0.0, 0.0])[0] = s.value
            elif phase and s.name.endswith("_count"):
                out.setdefault(phase, [0.0, 0.0])[1] = s.value
    return {k: (v[0], v[1]) for k, v in out.items()} or None


def server_time_delta(before: dict[str, tuple[float, float]] | None,
                      after: dict[str, tuple[float, float]] | None) -> dict[str, float | None] | None:
    """Mean seconds per request of each phase between two scrapes."""
    if before is None or after is None:
        return None
    out: dict[str, float | None] = {}
    for phase, (s1, c1) in after.items():
        s0, c0 = before.get(phase, (0.0, 0.0))
        out[phase] = (s1 - s0) / (c1 - c0) if c1 > c0 else None
    return out


# --------------------------------------------------------------------------- the workload


class AgentWorkload(Workload):
    """Multi-turn agent conversations through one endpoint (see the module docstring)."""

    answers_with_text = False  # every turn is an agent step: tool calls are the expected answer

    def __init__(self, name: str, endpoint: str, help: str, servers: tuple[str, ...]) -> None:
        self.name, self.endpoint, self.help, self.servers = name, endpoint, help, servers
        self._extra: dict[str, Any] = {}

    def applies_to(self, server: str) -> bool:
        return server in self.servers

    def fields(self, server: str, vllm_tools: str) -> dict[str, Any]:
        return {"tools": AGENT_TOOLS, "tool_choice": "auto"}

    def level_extra(self) -> dict[str, Any]:
        return {"agent": self._extra}

    def _payload(self, spec: LevelSpec, system: str, task: str, turn: int, max_tokens: int | None = None) -> dict[str, Any]:
        return PAYLOADS[self.endpoint](spec.model_id, system, task, turn, spec.output_tokens if max_tokens is None
                                       else max_tokens, spec.temperature)

    async def _conversations(self, spec: LevelSpec, sessions: list[str], turns: int, system_tokens: int,
                             max_tokens: int | None = None) -> tuple[list[list[RequestResult]], list[dict[str, Any] | None], float]:
        import httpx

        count = spec.options.get("token_count")
        systems = [system_prompt(system_tokens, s, count) for s in sessions]
        per_turn_server: list[dict[str, Any] | None] = [None] * turns
        c = len(sessions)
        limits = httpx.Limits(max_connections=c + 2, max_keepalive_connections=c + 2)
        tmo = httpx.Timeout(connect=10.0, read=spec.timeout, write=60.0, pool=spec.timeout)
        async with httpx.AsyncClient(limits=limits, timeout=tmo, trust_env=False) as client:
            async def conversation(i: int) -> list[RequestResult]:
                out = []
                for turn in range(turns):
                    before = await server_time(client, spec.url) if c == 1 else None
                    r = await stream_turn(client, spec.url, self.endpoint,
                                          self._payload(spec, systems[i], f"[{sessions[i]}] Fix the failing tests "
                                                        "and explain the cause.", turn, max_tokens), spec.timeout)
                    if c == 1:
                        per_turn_server[turn] = server_time_delta(before, await server_time(client, spec.url))
                    out.append(r)
                return out

            before = await server_time(client, spec.url)
            t0 = time.perf_counter()
            results = await asyncio.gather(*(conversation(i) for i in range(c)))
            wall = time.perf_counter() - t0
            self._level_server = server_time_delta(before, await server_time(client, spec.url))
        return list(results), per_turn_server, wall

    async def run_level(self, spec: LevelSpec) -> tuple[list[RequestResult], float]:
        """``spec.concurrency`` conversations at once, each ``agent_turns`` turns in order."""
        turns = int(spec.options.get("agent_turns", DEFAULT_TURNS))
        system_tokens = int(spec.options.get("agent_system_tokens", DEFAULT_SYSTEM_TOKENS))
        # same sessions for both servers: glmserve and vLLM must prefill the same text
        sessions = [f"L{spec.concurrency}-{spec.first_id}-{i}" for i in range(spec.concurrency)]
        convs, per_turn_server, wall = await self._conversations(spec, sessions, turns, system_tokens)
        per_turn = []
        for t in range(turns):
            rs = [conv[t] for conv in convs]
            ttfts = [r.ttft for r in rs if r.ok and r.ttft is not None]
            entry: dict[str, Any] = {
                "turn": t + 1,
                "ttft_p50_s": percentile(ttfts, 50),
                "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else None,
                "prompt_tokens": [r.prompt_tokens for r in rs],
                "errors": sum(1 for r in rs if not r.ok),
            }
            st = per_turn_server[t]
            if st is not None:
                entry["server_s"] = st
                if entry["ttft_mean_s"] and st.get("prepare") is not None:
                    entry["prepare_share_of_ttft"] = st["prepare"] / entry["ttft_mean_s"]
            per_turn.append(entry)
        first = per_turn[0]["ttft_p50_s"]
        later = [e["ttft_p50_s"] for e in per_turn[1:] if e["ttft_p50_s"] is not None]
        self._extra = {
            "endpoint": self.endpoint,
            "conversations": spec.concurrency,
            "turns": turns,
            "system_tokens_target": system_tokens,
            "tools": len(AGENT_TOOLS),
            "per_turn": per_turn,
            "later_over_first_ttft": (sum(later) / len(later) / first) if later and first else None,
            "server_s_per_request": self._level_server,
        }
        return [r for conv in convs for r in conv], wall

    async def warm_up(self, spec: LevelSpec, count: int) -> list[RequestResult]:
        """Short conversations with the same tools (grammar compiled, code paths warm), a small
        system prompt and their own sessions (nothing of them is reused by the measured levels)."""
        if count <= 0:
            return []
        convs, _, _ = await self._conversations(spec, [f"warm-{i}" for i in range(count)], 2, 200, max_tokens=8)
        return [r for conv in convs for r in conv]


AGENT_WORKLOADS = (
    AgentWorkload("agent", "chat", "multi-turn agent through Chat Completions: ~15K-token system prompt, 20 tools, "
                  "one tool call + result per turn (vLLM: use --vllm-tool-parser glmserve-glm4)", ("glmserve", "vllm")),
    AgentWorkload("agent-messages", "messages", "the agent conversation through Anthropic Messages (glmserve only)",
                  ("glmserve",)),
    AgentWorkload("agent-responses", "responses", "the agent conversation through OpenAI Responses (glmserve only)",
                  ("glmserve",)),
)


def prompt_token_check(servers: dict[str, Any], workload: str = "agent") -> list[str]:
    """Lines comparing glmserve's and vLLM's prompt tokens per level and turn (they must match
    for the comparison to be like for like)."""
    g = servers.get("glmserve", {}).get("workloads", {}).get(workload, {})
    v = servers.get("vllm", {}).get("workloads", {}).get(workload, {})
    lines = []
    for level in g:
        if level not in v:
            continue
        for tg, tv in zip(g[level]["agent"]["per_turn"], v[level]["agent"]["per_turn"]):
            pg, pv = tg["prompt_tokens"], tv["prompt_tokens"]
            verdict = "match" if pg == pv else "DIFFER"
            lines.append(f"{workload} conc {level} turn {tg['turn']}: prompt tokens glmserve {pg} vLLM {pv}: {verdict}")
    return lines

