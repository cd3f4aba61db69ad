"""Incremental scanners shared by the JSON-bodied parsers (GLM JSON calls, Hermes calls).

Each one is fed pieces of streamed text and does work proportional to the new text only.
"""

from __future__ import annotations

import re

WS = " \t\r\n"
"""What JSON and the call layouts count as whitespace."""

_STR_SPECIAL = re.compile(r'["\\]')
_STRUCT = re.compile(r'["{}\[\]]')
_ATOM_END = re.compile(r'[,}\]\s]')


class ValueScanner:
    """Finds where one JSON value ends, fed in pieces, in O(new text).

    Call :meth:`feed` with the first piece positioned at the value's first character.
    It only tracks strings, escapes and nesting; it does not validate.
    """

    __slots__ = ("kind", "depth", "in_str", "esc")

    def __init__(self) -> None:
        self.kind: str | None = None  # "c" container, "s" string, "a" atom
        self.depth = 0
        self.in_str = False
        self.esc = False

    def feed(self, s: str, pos: int = 0) -> int:
        """Index in ``s`` just past the value's end, or -1 when it has not ended yet."""
        n = len(s)
        i = pos
        if i >= n:
            return -1
        if self.kind is None:
            c = s[i]
            if c in "{[":
                self.kind, self.depth = "c", 1
                i += 1
            elif c == '"':
                self.kind, self.in_str = "s", True
                i += 1
            else:
                self.kind = "a"
        if self.kind == "a":
            m = _ATOM_END.search(s, i)
            if m:
                return m.start()
            return -1
        while i < n:
            if self.esc:
                self.esc = False
                i += 1
                continue
            if self.in_str:
                m = _STR_SPECIAL.search(s, i)
                if not m:
                    return -1
                i = m.start()
                if s[i] == "\\":
                    self.esc = True
                    i += 1
                    continue
                self.in_str = False
                i += 1
                if self.kind == "s":
                        return i
                continue
            m = _STRUCT.search(s, i)
            if not m:
                return -1
            i = m.start()
            c = s[i]
            i += 1
            if c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 0:
                        return i
        return -1


def partial_suffix(s: str, marker: str) -> int:
    """Length of the longest suffix of ``s`` that is a proper prefix of ``marker``.

    Such a suffix starts with the marker's first character, so only those positions are tried:
    on ordinary text (no ``<`` near the end) this is one ``find`` per delta.
    """
    first = marker[0]
    i = s.find(first, max(0, len(s) - len(marker) + 1))
    while i >= 0:
        if marker.startswith(s[i:]):
            return len(s) - i
        i = s.find(first, i + 1)
    return 0


class MarkerScanner:
    """Finds a marker in streamed text, holding back only a possible partial marker."""

    __slots__ = ("marker", "held")

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.held = ""

    def scan(self, s: str, pos: int) -> tuple[str, int, bool]:
        """Returns ``(text before the marker or safe to emit, new position, found)``.

        When found, the position is just past the marker.  When not found, all of ``s``
        from ``pos`` is consumed (part of it may now be held).
        """
        m = self.marker
        L = len(m)
        emitted = ""
        if self.held:
            held = self.held
            t = held + s[pos : pos + L]
            i = t.find(m)
            if 0 <= i < len(held):
                self.held = ""
                return held[:i], pos + i + L - len(held), True
            if len(s) - pos < L:
                k = partial_suffix(t, m)
                self.held = t[len(t) - k :] if k else ""
                return t[: len(t) - k], len(s), False
            self.held = ""
            emitted = held
        i = s.find(m, pos)
        if i >= 0:
            return emitted + s[pos:i], i + L, True
        tail = s[max(pos, len(s) - L + 1) :]
        k = partial_suffix(tail, m)
        end = len(s) - k
        self.held = s[end:]
        return emitted + s[pos:end], len(s), False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
