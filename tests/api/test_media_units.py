"""Media measured without decoding (:mod:`glmserve.api.media`): ``b64_size`` accepts exactly
what ``base64.b64decode(..., validate=True)`` accepts and gives the decoded length; media the
server stored itself (a Responses history) is measured without being checked again."""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from glmserve.api import media
from glmserve.api.errors import APIError
from glmserve.api.media import MediaNotes, b64_length, b64_size
from glmserve.api.responses.mapping import items_to_messages
from glmserve.api.responses.schemas import ResponsesRequest

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def decoded(text: str) -> int | None:
    try:
        return len(base64.b64decode(text.strip(), validate=True))
    except (binascii.Error, ValueError):
        return None


def measured(text: str) -> int | None:
    try:
        return b64_size(text, "p")
    except APIError:
        return None


@given(st.one_of(st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
                 st.text(alphabet=_ALPHABET + "=-_ \n\u00e9", max_size=24)))
@example("")
@example("QQ==")
@example("QQ=")
@example("QQ=A")
@example("Q===")
@example(" QUFB ")
@example("QU\nFB")
@settings(max_examples=300, derandomize=True, deadline=None)
def test_b64_size_accepts_what_b64decode_accepts(text: str) -> None:
    assert measured(text) == decoded(text)
    if decoded(text) is not None:
        assert b64_length(text) == decoded(text)


def test_b64_size_refuses_what_is_not_a_string() -> None:
    for value in (5, None, ["QQ=="], {"data": "QQ=="}):
        with pytest.raises(APIError, match="must be a base64 string"):
            b64_size(value, "p")


def test_a_stored_history_is_measured_not_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The items ``previous_response_id`` reads back were validated when first sent: however
    often a conversation resends a large image, only the new turn's media is checked."""
    png = base64.b64encode(bytes(3000)).decode()
    item = {"role": "user", "content": [{"type": "input_image", "image_url": f"data:image/png;base64,{png}"}]}
    items = ResponsesRequest.model_validate({"input": [item, item, item]}).input
    checked: list[str] = []
    real = media.b64_size
    monkeypatch.setattr(media, "b64_size", lambda data, param: checked.append(param) or real(data, param))
    notes = MediaNotes()
    messages = items_to_messages(items, media=notes, stored=2,
                                 params=["previous_response_id (item 0)", "previous_response_id (item 1)", "input[0]"])
    assert checked == ["input[0].content[0].image_url"]  # the new turn's image only
    assert [a.size for a in notes.replaced] == [3000, 3000, 3000]
    assert all("(image/png, 3000 bytes)" in m["content"] for m in messages)
    assert not notes.trusted  # left as it was found
