"""``--argument-hook MODULE:FUNCTION``: off by default, applied to each finished call when set.

Servers: the shared ``glm4_server`` (no hook) and one tiny GLM-4 server started here with
``--argument-hook glmserve.hooks:example_city_names``.  Same model, same prompt, greedy
decoding under the same grammar, so both produce the same raw call; the hook server must
return exactly ``example_city_names(raw)`` and the plain server exactly ``raw``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from glmserve.hooks import CITY_NAMES, example_city_names, identity
from servers import start_server

HOOK = "glmserve.hooks:example_city_names"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "天气预报",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["北京", "上海"]},
                           "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
MSGS = [{"role": "user", "content": "北京今天天气怎么样？"}]


# --------------------------------------------------------------------------- the example hook itself


def test_example_hook_maps_whole_string_values_only():
    out = example_city_names("f", json.dumps({"city": "北京", "trip": ["上海", "成都"], "note": "北京 is big",
                                              "北京": 1, "n": 2, "deep": {"to": " 杭州 "}}, ensure_ascii=False))
    assert json.loads(out) == {"city": "Beijing", "trip": ["Shanghai", "Chengdu"], "note": "北京 is big",
                               "北京": 1, "n": 2, "deep": {"to": "Hangzhou"}}
    assert "\\u" not in out  # re-serialised with non-ASCII kept


@pytest.mark.parametrize("raw", ['{"city":  "Paris"}', '{"q": "北京烤鸭"}', "not json {", '{"city": "北京"', "[]",
                                 "{}"])
def test_example_hook_returns_untouched_arguments_unchanged(raw):
    assert example_city_names("any", raw) is raw  # the very same string: spacing and escapes kept


def test_identity_hook():
    raw = '{"city": "北京"}'
    assert identity("get_weather", raw) is raw
    assert set(CITY_NAMES) >= {"北京", "上海"}


# --------------------------------------------------------------------------- served


@pytest.fixture(scope="module")
def hook_server():
    from tiny_models import build_tiny

    s = start_server(str(build_tiny("glm4")), "--chat-format", "glm4", "--served-model-name", "tiny-glm4",
                     "--argument-hook", HOOK)
    yield s
    s.stop()


def _call(server, stream=False):
    c = server.client()
    kw = dict(model="tiny-glm4", messages=MSGS, tools=[WEATHER], tool_choice=NAMED, temperature=0, max_tokens=48)
    if not stream:
        r = c.chat.completions.create(**kw)
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls"
        return call.id, call.function.name, call.function.arguments
    ids, names, fragments = set(), [], []
    for ch in c.chat.completions.create(stream=True, **kw):
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            assert tc.index == 0
            if tc.id:
                ids.add(tc.id)
            if tc.function and tc.function.name:
                names.append(tc.function.name)
            if tc.function and tc.function.arguments:
                fragments.append(tc.function.arguments)
    assert len(ids) == 1 and names == ["get_weather"]
    return ids.pop(), fragments


@pytest.mark.e2e
def test_without_hook_arguments_are_the_models_own_text(glm4_server):
    _, name, raw = _call(glm4_server)
    args = json.loads(raw)
    assert name == "get_weather" and args["city"] in ("北京", "上海") and args["unit"] in ("c", "f")
    assert args["city"] in raw and "\\u" not in raw  # Chinese kept as written, not escaped
    _, fragments = _call(glm4_server, stream=True)
    # streamed piece by piece as generated, and the pieces are exactly the final text
    assert len(fragments) > 1 and "".join(fragments) == raw


@pytest.mark.e2e
def test_hook_rewrites_finished_calls_streamed_and_not(glm4_server, hook_server):
    _, _, raw = _call(glm4_server)
    _, name, hooked = _call(hook_server)
    assert name == "get_weather"
    assert hooked == example_city_names("get_weather", raw) != raw
    assert json.loads(hooked)["city"] == CITY_NAMES[json.loads(raw)["city"]]
    _, fragments = _call(hook_server, stream=True)
    # with a hook the arguments come once, whole, when the call ends
    assert fragments == [hooked]


@pytest.mark.e2e
def test_hook_leaves_text_answers_alone(hook_server):
    r = hook_server.client().chat.completions.create(model="tiny-glm4", messages=MSGS, tools=[WEATHER],
                                                     tool_choice="none", temperature=0, max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_bad_hook_spec_is_refused_at_start(tmp_path):
    """A hook that cannot be loaded stops ``serve`` before the engine starts."""
    for spec, needle in [("glmserve.hooks", "MODULE:FUNCTION"), ("glmserve.hooks:no_such_hook", "no_such_hook")]:
        p = subprocess.run([sys.executable, "-m", "glmserve", "serve", str(tmp_path), "--argument-hook", spec],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode != 0
        assert needle in p.stderr + p.stdout, (p.stderr + p.stdout)[-3000:]
