"""``glmserve chat``: an interactive terminal chat against a running OpenAI-compatible server.

    glmserve chat [--url URL] [--model M] [--api-key K] [--tools tools.json]
                  [--tool-choice auto|required|none|NAME] [--system TEXT] [--max-tokens N]

Everything streams: the assistant's text is printed as it arrives, and tool calls are
printed as they arrive too (the name, then the argument fragments).  When the assistant
calls tools you are asked for each call's result (one line; type JSON or plain text), and
the conversation continues with those results, as an agent loop would.

Commands at the ``you>`` prompt: ``/quit`` (or end of input) leaves, ``/reset`` forgets the
conversation (the ``--system`` message stays).  Input is read from stdin line by line, so
a session can be scripted: ``printf 'hi\\n/quit\\n' | glmserve chat``.

``--tool-choice`` applies to the first request of each of your turns; after you have
supplied tool results the follow-up request uses ``--followup-tool-choice`` (default
``auto``), so ``required`` cannot loop forever.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

PROMPT = "you> "
ASSISTANT = "assistant> "


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glmserve chat",
                                description="Interactive terminal chat against a running OpenAI-compatible server.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Commands: /quit, /reset.  Input is read from stdin, so it can be piped.")
    p.add_argument("--url", default=os.environ.get("GLMSERVE_URL", "http://127.0.0.1:8000"),
                   help="server address, with or without /v1 (default http://127.0.0.1:8000, or $GLMSERVE_URL)")
    p.add_argument("--model", default=None, help="model name (default: the first one the server lists)")
    p.add_argument("--api-key", default=None,
                   help="API key (default: $GLMSERVE_API_KEY, then $OPENAI_API_KEY, else none)")
    p.add_argument("--tools", default=None, metavar="FILE",
                   help="JSON file with tools: a list of OpenAI tool objects, or an object with a 'tools' list")
    p.add_argument("--tool-choice", default=None, metavar="CHOICE",
                   help="auto / required / none / the name of one tool (default: the server's, auto with tools)")
    p.add_argument("--followup-tool-choice", default="auto", metavar="CHOICE",
                   help="tool_choice for the request that follows tool results (default auto)")
    p.add_argument("--no-parallel-tool-calls", dest="parallel_tool_calls", action="store_false", default=None,
                   help="ask for at most one tool call per reply (parallel_tool_calls=false)")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message to start the conversation with")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="max tokens per reply")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the server's)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    return p


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _load_tools(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict):
        data = data.get("tools")
    if not isinstance(data, list) or not all(isinstance(t, dict) for t in data):
        raise ValueError("expected a JSON list of tools, or an object with a 'tools' list")
    out = []
    for t in data:
        if "function" not in t and "name" in t:  # a bare function definition
            t = {"type": "function", "function": t}
        if not isinstance(t.get("function"), dict) or not t["function"].get("name"):
            raise ValueError(f"a tool without a function name: {json.dumps(t, ensure_ascii=False)[:200]}")
        out.append(t)
    return out


def _tool_choice(choice: str | None, tools: list[dict[str, Any]]) -> Any:
    if choice is None or choice in ("auto", "required", "none"):
        return choice
    names = [t["function"]["name"] for t in tools]
    if choice not in names:
        raise ValueError(f"--tool-choice {choice!r} is not one of the tools ({', '.join(names) or 'none given'})")
    return {"type": "function", "function": {"name": choice}}


class Chat:
    """The conversation and one streamed exchange at a time."""

    def __init__(self, client: Any, model: str, args: argparse.Namespace, tools: list[dict[str, Any]],
                 stdin: TextIO, stdout: TextIO) -> None:
        self.client = client
        self.model = model
        self.args = args
        self.tools = tools
        self.stdin = stdin
        self.out = stdout
        self.echo = not stdin.isatty()  # piped input: show it, so the transcript reads as a dialogue
        self.messages: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.args.system}] if self.args.system else []

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def read(self, prompt: str) -> str | None:
        self.write(prompt)
        line = self.stdin.readline()
        if not line:
            self.write("\n")
            return None
        line = line.rstrip("\r\n")
        if self.echo:
            self.write(line + "\n")
        return line

    # ---------------------------------------------------------------- one reply

    def request(self, tool_choice: Any) -> dict[str, Any]:
        """Stream one assistant reply, printing it as it comes; returns the assistant message."""
        kw: dict[str, Any] = {"model": self.model, "messages": self.messages, "stream": True}
        if self.tools:
            kw["tools"] = self.tools
            if tool_choice is not None:
                kw["tool_choice"] = tool_choice
            if getattr(self.args, "parallel_tool_calls", None) is False:
                kw["parallel_tool_calls"] = False
        for name in ("max_tokens", "temperature", "seed"):
            value = getattr(self.args, name)
            if value is not None:
                kw[name] = value
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        # what the current output line is: None (nothing yet), "text", "reasoning" or "call"
        line: str | None = None
        current = -1  # index of the call on the current line
        finish = None

        def begin(kind: str, head: str) -> None:
            nonlocal line
            if line == "call":
                self.write(")")
            if line is not None:
                self.write("\n")
            self.write(head)
            line = kind

        stream = self.client.chat.completions.create(**kw)
        try:
            for chunk in stream:
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                delta = choice.delta
                finish = choice.finish_reason or finish
                extra = delta.model_extra or {}
                reasoning = extra.get("reasoning_content") or extra.get("reasoning")
                if reasoning:
                    if line != "reasoning":
                        begin("reasoning", "(thinking) ")
                    self.write(reasoning)
                if delta.content:
                    if line != "text":
                        begin("text", ASSISTANT)
                    content.append(delta.content)
                    self.write(delta.content)
                for tc in delta.tool_calls or []:
                    slot = calls.get(tc.index)
                    if slot is None:
                        slot = calls[tc.index] = {"id": tc.id or f"call_{tc.index}", "type": "function",
                                                  "function": {"name": "", "arguments": ""}}
                    fn = tc.function
                    if fn is not None and fn.name:
                        slot["function"]["name"] += fn.name
                        if line != "call" or current != tc.index:
                            begin("call", f"{ASSISTANT}[tool call {tc.index + 1}] {fn.name}(")
                            current = tc.index
                    if fn is not None and fn.arguments:
                        slot["function"]["arguments"] += fn.arguments
                        self.write(fn.arguments)
        except KeyboardInterrupt:
            finish = "interrupted"
            stream.close()
        if line is None:
            self.write(ASSISTANT)
        elif line == "call":
            self.write(")")
        self.write("\n")
        if finish in ("length", "interrupted"):
            self.write(f"[{'cut off at --max-tokens' if finish == 'length' else 'interrupted'}]\n")
        complete = []
        for i in sorted(calls):
            if finish in ("length", "interrupted") and not _is_json(calls[i]["function"]["arguments"]):
                self.write(f"[tool call {i + 1} was cut off; it is not run]\n")
            else:
                complete.append(calls[i])
        message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
        if complete:
            message["tool_calls"] = complete
        return message

    # ---------------------------------------------------------------- the loop

    def turn(self, text: str, first_choice: Any, followup_choice: Any) -> bool:
        """One user turn, with as many tool rounds as the assistant wants; False at end of input."""
        self.messages.append({"role": "user", "content": text})
        choice = first_choice
        while True:
            message = self.request(choice)
            self.messages.append(message)
            calls = message.get("tool_calls") or []
            if not calls:
                return True
            for call in calls:
                fn = call["function"]
                result = self.read(f"result of {fn['name']} [{call['id']}]> ")
                if result is None or result.strip() in ("/quit", "/exit"):
                    return False
                if result.strip() == "/reset":
                    self.reset()
                    self.write("[conversation reset]\n")
                    return True
                self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
            choice = followup_choice

    def run(self) -> int:
        first = _tool_choice(self.args.tool_choice, self.tools)
        followup = _tool_choice(self.args.followup_tool_choice, self.tools)
        import openai

        while True:
            try:
                line = self.read(PROMPT)
            except KeyboardInterrupt:
                self.write("\n")
                return 0
            if line is None:
                return 0
            cmd = line.strip()
            if not cmd:
                continue
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/reset":
                self.reset()
                self.write("[conversation reset]\n")
                continue
            if cmd.startswith("/") and " " not in cmd:
                self.write(f"[unknown command {cmd}; /quit or /reset]\n")
                continue
            keep = len(self.messages)
            try:
                if not self.turn(line, first, followup):
                    return 0
            except openai.APIError as exc:
                del self.messages[keep:]  # the failed turn is not part of the conversation
                self.write("\n")
                print(f"error: {_describe(exc)}", file=sys.stderr)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _describe(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body["error"] if isinstance(body.get("error"), dict) else body
        if err.get("message"):
            return str(err["message"])
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        tools = _load_tools(args.tools) if args.tools else []
        _tool_choice(args.tool_choice, tools)
        _tool_choice(args.followup_tool_choice, tools)
    except (OSError, ValueError) as exc:
        print(f"glmserve chat: {exc}", file=sys.stderr)
        return 2
    import openai

    key = (args.api_key or os.environ.get("GLMSERVE_API_KEY", "").split(",")[0] or os.environ.get("OPENAI_API_KEY")
           or "none")
    client = openai.OpenAI(base_url=_base_url(args.url), api_key=key, max_retries=0, timeout=600)
    model = args.model
    if model is None:
        try:
            models = [m.id for m in client.models.list()]
        except openai.APIError as exc:
            print(f"glmserve chat: cannot list models at {_base_url(args.url)}: {_describe(exc)}", file=sys.stderr)
            return 1
        if not models:
            print("glmserve chat: the server lists no models; pass --model", file=sys.stderr)
            return 1
        model = models[0]
    chat = Chat(client, model, args, tools, sys.stdin, sys.stdout)
    chat.write(f"[{model} at {_base_url(args.url)}; /quit to leave, /reset to start over]\n")
    try:
        return chat.run()
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
