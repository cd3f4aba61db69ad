"""The playground (``/ui``) and the request inspector, in a real browser.

On the scripted engine (tests/scripted_server.py, GLM-4.7 output chosen by the prompt, an API
key, the inspector on) each API makes a tool call with ``tool_choice: required``, the page
shows it as a card that validates against the schema, the user's tool result continues the
conversation, and the turn's link opens its inspector entry with the rendered prompt.  On the
real embedded model (SmolLM2, ChatML) the same, with the Chinese tool example, under the
decoding constraint.  Keyboard (Enter sends), the phone's width, the key prompt and the
thinking switch are covered too; no test may leave a console error or warning behind.
"""

from __future__ import annotations

import json

import pytest

from browser import PHONE, SCRIPTED_KEY, chromium, open_page, scripted_ui  # noqa: F401  (fixtures)
from scripted_server import PLAYGROUND_REASONING

APIS = ["chat.completions", "messages", "responses"]


def wait_answer(p, n: int):
    """The n-th assistant turn (0-based), once it has finished."""
    turn = p.locator(".turn.assistant").nth(n)
    turn.locator(".foot .finish").wait_for()
    return turn


@pytest.mark.parametrize("api", APIS)
def test_tool_call_round_trip(scripted_ui, open_page, api):
    page = open_page(scripted_ui, key=SCRIPTED_KEY)
    p = page.page
    assert p.locator("#format-badge").inner_text() == "format glm47"
    p.select_option("#api", api)
    p.select_option("#tool-choice", "required")
    p.fill("#input", "What's the weather in Paris?")
    p.press("#input", "Enter")  # Enter sends

    first = wait_answer(p, 0)
    card = first.locator(".call-card[data-valid=true]")
    card.wait_for()
    assert card.locator(".call-name").inner_text() == "get_weather"
    assert json.loads(card.locator(".args").inner_text()) == {"city": "Paris", "unit": "celsius"}
    assert card.locator(".badge").inner_text() == "✓ valid against the schema"
    assert first.locator(".reasoning-text").text_content() == PLAYGROUND_REASONING  # shown apart from the answer
    assert first.locator(".text").text_content() == ""
    assert first.locator(".finish").inner_text() == {"chat.completions": "tool_calls", "messages": "tool_use",
                                                      "responses": "completed"}[api]

    card.locator(".result-input").fill('{"temperature": 21}')
    card.locator(".result-input").press("Enter")
    answer = wait_answer(p, 1)
    assert answer.locator(".text").inner_text() == 'The tool answered: {"temperature": 21}. Enjoy the day!'
    assert answer.locator(".call-card").count() == 0
    assert p.locator("#tool-choice").input_value() == "auto"  # back from required, as agent SDKs do
    page.shot(f"scripted-{api}-chat")

    answer.locator(".inspect-link").click()
    p.locator("#insp-body pre.prompt mark.ctl").first.wait_for()
    prompt = p.locator("#insp-body pre.prompt").inner_text()
    assert '<tool_response>{"temperature": 21}</tool_response>' in prompt
    marks = p.locator("#insp-body pre.prompt mark.ctl").all_inner_texts()
    assert marks[:2] == ["[gMASK]", "<sop>"] and "<|observation|>" in marks and marks[-1] == "<think>"
    head = p.locator("#insp-body .insp-head").inner_text()
    assert api in head and "200" in head
    assert "The tool answered" in p.locator("#insp-body pre.raw").inner_text()
    page.shot(f"scripted-{api}-inspector")

    p.click("#insp-back")  # the list: both requests of the conversation, newest first
    rows = p.locator("#insp-body .entry-row")
    rows.first.wait_for()
    assert "tool_calls → get_weather" in rows.nth(1).inner_text() or "get_weather" in rows.nth(1).inner_text()
    p.click("#insp-close")
    assert p.locator("#inspector").is_hidden()
    assert page.problems == []


def test_invalid_arguments_are_shown_as_such(scripted_ui, open_page):
    """The scripted model writes ``unit: kelvin`` (no constraint holds a scripted engine): the
    card says the arguments break the schema, and so does the inspector's final call."""
    page = open_page(scripted_ui, key=SCRIPTED_KEY)
    p = page.page
    p.select_option("#tool-choice", "auto")
    p.fill("#input", "invalid weather please")
    p.locator("#send").click()
    card = wait_answer(p, 0).locator(".call-card[data-valid=false]")
    card.wait_for()
    badge = card.locator(".badge.bad").inner_text()
    assert "unit" in badge and "kelvin" in badge
    p.locator(".inspect-link").click()
    bad = p.locator("#insp-body .call-card .badge.bad")
    bad.wait_for()
    assert "kelvin" in bad.inner_text()
    assert page.problems == []


def test_phone_width_key_entry_and_thinking_off(scripted_ui, open_page):
    page = open_page(scripted_ui, viewport=PHONE)  # no key yet: the page asks for it, sending nothing
    p = page.page
    assert p.locator("#api-key").is_visible() and p.locator("#model-badge").inner_text() == "API key needed"
    p.fill("#api-key", SCRIPTED_KEY)
    p.press("#api-key", "Tab")
    # a locator, not wait_for_function: a string predicate is eval'd, which the page's CSP forbids
    p.locator("#model option").first.wait_for(state="attached")
    assert p.locator("#thinking-box").is_visible() and p.locator("#budget-row").is_visible()  # GLM-4.7 has both
    p.uncheck("#thinking")
    p.select_option("#tool-choice", "none")
    page.shot("scripted-phone-settings")
    p.click("#close-settings")
    assert p.locator("#settings").is_hidden() and p.locator("#input").is_visible()

    p.fill("#input", "Hello")
    p.press("#input", "Enter")
    turn = wait_answer(p, 0)
    assert turn.locator(".text").inner_text() == "Hello from the scripted engine."
    assert turn.locator(".reasoning").is_hidden()  # thinking off: no reasoning at all
    assert p.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.shot("scripted-phone-chat")

    p.click("#open-inspector")
    row = p.locator("#insp-body .entry-row").first
    row.wait_for()
    assert p.locator("#inspector").bounding_box()["width"] == PHONE["width"]
    row.click()
    p.locator("#insp-body pre.prompt").wait_for()
    assert p.locator("#insp-body pre.prompt mark.ctl").last.inner_text() == "</think>"  # the thinking-off prompt
    assert p.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.shot("scripted-phone-inspector")
    assert page.problems == []


@pytest.mark.e2e
def test_real_model_tool_call(default_server, open_page):
    """The embedded SmolLM2 (ChatML): a required call with the Chinese example's tools comes
    out valid under the decoding constraint, the result is answered in text, and the inspector
    shows the ChatML prompt the server rendered."""
    page = open_page(default_server.url)
    p = page.page
    assert p.locator("#format-badge").inner_text() == "format chatml"
    assert p.locator("#thinking-box").is_hidden()  # ChatML has no reasoning switch
    p.select_option("#example", "chinese")
    p.select_option("#tool-choice", "required")
    p.uncheck("#parallel")  # one call, enforced while decoding
    p.fill("#max-tokens", "128")
    p.fill("#temperature", "0")
    p.fill("#input", "北京今天天气怎么样？")
    p.press("#input", "Enter")

    first = wait_answer(p, 0)
    card = first.locator(".call-card[data-valid=true]")
    card.wait_for()
    assert first.locator(".call-card").count() == 1
    name = card.locator(".call-name").inner_text()
    assert name in ("get_weather", "search_web")
    args = json.loads(card.locator(".args").inner_text())
    assert {"get_weather": "city", "search_web": "query"}[name] in args
    assert first.locator(".finish").inner_text() == "tool_calls"

    p.select_option("#tool-choice", "none")  # the answer in words, whatever a 135M model would pick
    p.fill("#max-tokens", "32")
    card.locator(".result-input").fill("晴，25°C")
    first.locator(".send-results").click()
    answer = wait_answer(p, 1)
    assert answer.locator(".text").inner_text().strip()
    assert answer.locator(".call-card").count() == 0
    page.shot("real-model-chat")

    answer.locator(".inspect-link").click()
    p.locator("#insp-body pre.prompt mark.ctl").first.wait_for()
    assert "晴，25°C" in p.locator("#insp-body pre.prompt").inner_text()
    marks = p.locator("#insp-body pre.prompt mark.ctl").all_inner_texts()
    assert marks[0] == "<|im_start|>" and marks.count("<|im_end|>") >= 3
    page.shot("real-model-inspector")
    assert page.problems == []
