"""A custom tool's grammar holds on the real engine: Codex's ``apply_patch`` Lark grammar, a tiny
random-weight GLM model, vLLM's structured outputs (xgrammar).

A random model never ends a line by itself, so ``logit_bias`` gives it a few preferences, the
same at every step: the end of the value first, then a newline (the JSON families: its escape,
see below), then ``E``, then ``D`` (each also with a space before it).  Everything else is the
random weights' choice.
Without the constraint this model would close the value at once; with it, the only way out is a
complete patch: ``*** Begin Patch`` (forced), ``*** Delete File: `` (``D``), a file name, then
``*** End Patch`` (``E``).  The XML family's file name also shows the marker exclusion: the
top-ranked ``</arg_value>`` is a legal character run for ``/(.+)/`` but would end the value, so
the constraint must forbid it there.  The answer must parse by the Lark grammar (the ``lark``
package) and, streamed, be the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import lark
import pytest
from transformers import AutoTokenizer

from tiny_models import build_tiny

pytestmark = pytest.mark.e2e

DATA = Path(__file__).parents[1] / "data"
APPLY_PATCH = next(t for t in json.loads((DATA / "codex_custom_tool_request.json").read_text())["body"]["tools"]
                   if t["type"] == "custom")
LARK = APPLY_PATCH["format"]["definition"]
# the lark package refuses zero-width terminals: Codex's /(.*)/ is the same language as /(.+)/?
PARSER = lark.Lark(LARK.replace("/(.*)/", "/(.+)/?"), start="start")
TOOLS = [{"type": "function", "function": {"name": "exec_command", "parameters": {
             "type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}},
         {"type": "custom", "custom": {"name": "apply_patch", "description": APPLY_PATCH["description"],
                                       "format": {"type": "grammar", "grammar": {"syntax": "lark", "definition": LARK}}}}]
LETTERS = {"E": 80, " E": 80, "D": 70, " D": 70}  # with and without the space a literal may leave to them
PREFERENCES = {  # text -> bias; each must be one token of the tiny models' tokenizer
    "glm45": {"</arg_value>": 100, "\n": 90, **LETTERS},
    # inside a JSON string a newline is two tokens, \ then n; n must then outrank \ (which is also an
    # escape's second character), and a file name starts ".\" so that its first character is not n
    "glm4": {".\\": 95, "n": 90, "\\": 85, **LETTERS},
}


def biases(kind: str) -> dict[str, int]:
    tok = AutoTokenizer.from_pretrained(build_tiny(kind))
    out = {}
    for text, bias in PREFERENCES[kind].items():
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == 1, (text, ids)
        out[str(ids[0])] = bias
    return out


def test_apply_patch_input_parses_by_its_grammar_xml(glm45_server) -> None:
    check_patch(glm45_server, "glm45")


def test_apply_patch_input_parses_by_its_grammar_json(glm4_server) -> None:
    check_patch(glm4_server, "glm4")


def check_patch(server, kind: str) -> None:
    c = server.client()
    kw = dict(model=f"tiny-{kind}", messages=[{"role": "user", "content": "删除文件"}], tools=TOOLS,
              tool_choice={"type": "custom", "custom": {"name": "apply_patch"}}, temperature=0, max_tokens=160,
              logit_bias=biases(kind), extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    r = c.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "tool_calls", r
    (call,) = r.choices[0].message.tool_calls
    assert call.type == "custom" and call.custom.name == "apply_patch"
    patch = call.custom.input
    PARSER.parse(patch)  # raises unless the client could apply it
    assert patch.startswith("*** Begin Patch\n*** Delete File: ") and "*** End Patch" in patch, patch
    chunks = list(c.chat.completions.create(**kw, stream=True))
    streamed = "".join(tc.model_extra["custom"]["input"] for ch in chunks if ch.choices
                       for tc in ch.choices[0].delta.tool_calls or [])
    assert streamed == patch
