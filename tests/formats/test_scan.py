"""The shared streaming scanners: the fast partial-marker check agrees with its definition."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from glmserve.formats.scan import MarkerScanner, partial_suffix

MARKERS = ["<tool_call>", "</think>", "<|observation|>", "<arg_key>", "\n", "<<"]


def _by_definition(s: str, marker: str) -> int:
    """The longest suffix of ``s`` that is a proper prefix of ``marker``, by trying every length."""
    return max((k for k in range(1, min(len(marker) - 1, len(s)) + 1) if marker.startswith(s[-k:])), default=0)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(MARKERS), st.text(alphabet="<tol_cal>/|\nthink x", max_size=30))
def test_partial_suffix_is_the_longest_proper_prefix_at_the_end(marker, s):
    assert partial_suffix(s, marker) == _by_definition(s, marker)


def test_partial_suffix_examples():
    assert partial_suffix("hello <tool", "<tool_call>") == 5
    assert partial_suffix("hello <tool_call", "<tool_call>") == 10
    assert partial_suffix("a<<", "<<") == 1  # "<<" itself is not a proper prefix: only the last "<" is held
    assert partial_suffix("plain text", "<tool_call>") == 0
    assert partial_suffix("", "<tool_call>") == 0


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(MARKERS), st.lists(st.text(alphabet="<tol_cal>/|\nthink x", max_size=8), max_size=8))
def test_marker_scanner_finds_the_marker_across_any_split(marker, pieces):
    """Fed piece by piece, the scanner emits exactly the text before the first marker and finds it iff present."""
    whole = "".join(pieces)
    sc = MarkerScanner(marker)
    emitted, found = "", False
    for piece in pieces:
        pos = 0
        while pos < len(piece) and not found:
            text, pos, found = sc.scan(piece, pos)
            emitted += text
        if found:
            break
    if not found:
        emitted += sc.flush()
    i = whole.find(marker)
    assert found == (i >= 0)
    assert emitted == (whole[:i] if i >= 0 else whole)
