"""Custom (freeform) tools: a tool whose input is one string, not a JSON object.

OpenAI's custom tools (Responses ``{"type": "custom", "name", "description", "format"}``, Chat
Completions ``{"type": "custom", "custom": {...}}``) take raw text, optionally in a grammar:
``format: {"type": "grammar", "syntax": "lark" | "regex", "definition"}`` (Chat nests the last
two under ``grammar``); ``{"type": "text"}`` or no format is free text.  Codex declares
``apply_patch`` this way.  GLM models know only functions, so:

* **What the model sees**: a function taking one string argument, :data:`INPUT_KEY`, in the
  family's own tool format; the argument's description says the syntax and gives the grammar
  (:func:`input_parameters`).  History calls are written as calls with that one argument.
* **What is parsed**: the call, by the family's parser, as any other (arguments
  ``{"input": "..."}``); the API turns it into the client's shape, streaming the input's text
  out of the argument JSON as it arrives (:class:`InputDecoder`).
* **What is constrained**: the input, to the grammar.  xgrammar compiles Lark and regexes to
  its EBNF (:func:`text_grammar`); the XML families write the input raw up to
  ``</arg_value>``, so they take :func:`raw_grammar` (the grammar's texts without that marker),
  the JSON families and ChatML write it as a JSON string, so they take :func:`json_grammar`
  (the grammar of the escaped text; :mod:`glmserve.formats.ebnf` does both rewrites).  Free
  text is a plain string argument, constrained as one.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from glmserve.formats import caches, ebnf

INPUT_KEY = "input"
Syntax = Literal["text", "lark", "regex"]
SYNTAXES = ("lark", "regex")


class GrammarError(ValueError):
    """A custom tool's grammar that xgrammar cannot read, or that a family cannot place in its
    call format (says why; ``tool`` names the tool where the family knows it)."""

    def __init__(self, message: str, tool: str | None = None) -> None:
        super().__init__(message)
        self.tool = tool


def read_format(fmt: Any) -> tuple[Syntax, str]:
    """``(syntax, definition)`` of a custom tool's ``format`` in either API's shape (``("text",
    "")`` for free text).  Raises ``ValueError`` naming what is wrong."""
    if fmt is None:
        return "text", ""
    if not isinstance(fmt, dict):
        raise ValueError("must be an object")
    kind = fmt.get("type")
    if kind == "text":
        return "text", ""
    if kind != "grammar":
        raise ValueError(f"type must be 'text' or 'grammar', not {kind!r}")
    spec = fmt.get("grammar") if isinstance(fmt.get("grammar"), dict) else fmt  # Chat nests it
    syntax, definition = spec.get("syntax"), spec.get("definition")
    if syntax not in SYNTAXES:
        raise ValueError(f"syntax must be 'lark' or 'regex', not {syntax!r}")
    if not isinstance(definition, str) or not definition.strip():
        raise ValueError("a grammar needs its definition (a non-empty string)")
    return syntax, definition


def input_parameters(syntax: Syntax, definition: str) -> dict[str, Any]:
    """The one-string-argument schema the model is shown for a custom tool."""
    if syntax == "text":
        about = "The tool's input: raw text, written as it is (not JSON)."
    else:
        about = (f"The tool's input: raw text, written as it is (not JSON), that matches this {syntax} "
                 f"{'grammar' if syntax == 'lark' else 'expression'}:\n{definition}")
    return {"type": "object", "properties": {INPUT_KEY: {"type": "string", "description": about}},
            "required": [INPUT_KEY], "additionalProperties": False}


# --------------------------------------------------------------------------- grammars


@caches.cached(maxsize=256)
def _text_grammar(syntax: str, definition: str) -> str | tuple[str]:
    import xgrammar as xg

    try:
        g = xg.Grammar.from_lark(definition) if syntax == "lark" else xg.Grammar.from_regex(definition)
    except (RuntimeError, ValueError) as exc:  # xgrammar's C++ errors arrive as RuntimeError
        return (str(exc).strip().splitlines()[-1],)  # returned, not raised, so the verdict is cached
    return str(g)


def text_grammar(syntax: Syntax, definition: str) -> str:
    """xgrammar EBNF of the input text (root ``root``).  Raises :class:`GrammarError`."""
    out = _text_grammar(syntax, definition)
    if isinstance(out, tuple):
        raise GrammarError(f"xgrammar cannot read this {syntax} grammar: {out[0]}")
    return out


def check(syntax: Syntax, definition: str) -> None:
    """Raise :class:`GrammarError` unless xgrammar reads the grammar (cached)."""
    if syntax != "text":
        text_grammar(syntax, definition)


@caches.cached(maxsize=256)
def _rewritten(syntax: str, definition: str, how: str) -> str | tuple[str]:
    try:
        g = ebnf.parse(text_grammar(syntax, definition))  # type: ignore[arg-type]
        return str(ebnf.json_escaped(g) if how == "json" else ebnf.avoiding(g, how))
    except ebnf.Unsupported as exc:
        return (str(exc),)


def _rewrite(syntax: Syntax, definition: str, how: str, where: str, tool: str | None) -> str:
    out = _rewritten(syntax, definition, how)
    if isinstance(out, tuple):
        raise GrammarError(f"this {syntax} grammar cannot be enforced {where}: {out[0]}", tool)
    return out


def json_grammar(syntax: Syntax, definition: str, tool: str | None = None) -> str:
    """EBNF of the input written inside a JSON string (the JSON families, ChatML)."""
    return _rewrite(syntax, definition, "json", "inside a JSON string", tool)


def raw_grammar(syntax: Syntax, definition: str, marker: str, tool: str | None = None) -> str:
    """EBNF of the input written raw before ``marker`` (the XML families): the grammar's texts
    in which the marker does not occur."""
    return _rewrite(syntax, definition, marker, f"before {marker}", tool)


def json_arguments(tool: str, syntax: Syntax, definition: str) -> Any:
    """The structural-tag format of a custom call's arguments as JSON: ``{"input": "`` + the
    escaped input + ``"}`` (GLM's separators, as the JSON families' schemas compile)."""
    from xgrammar import structural_tag as st

    return st.SequenceFormat(elements=[st.ConstStringFormat(value='{"' + INPUT_KEY + '": "'),
                                       st.GrammarFormat(grammar=json_grammar(syntax, definition, tool)),
                                       st.ConstStringFormat(value='"}')])


# --------------------------------------------------------------------------- the call's input

_ESC = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_PRE, _IN, _ESCAPE, _HEX, _DONE, _LOST = range(6)
_OPENING = ("{", '"' + INPUT_KEY + '"', ":", '"')


class InputDecoder:
    """The text of the ``input`` string in a call's argument JSON, fed in pieces, in O(new text).

    The arguments of a custom tool's call are ``{"input": "..."}`` (the XML parser writes
    exactly that; the JSON families are constrained to it).  :meth:`feed` returns the newly
    decoded characters of the first ``input`` value; anything else (other keys first, a value
    that is not a string) gives nothing, and :func:`input_of` then falls back to the whole JSON.
    """

    __slots__ = ("state", "step", "pos", "hex", "high", "text")

    def __init__(self) -> None:
        self.state = _PRE
        self.step = self.pos = 0  # where in _OPENING the reading is
        self.hex = ""
        self.high: str | None = None  # a high surrogate waiting for its pair
        self.text: list[str] = []

    @property
    def found(self) -> bool:
        """Whether the ``input`` string began (its text so far is :attr:`value`)."""
        return self.state in (_IN, _ESCAPE, _HEX, _DONE)

    @property
    def closed(self) -> bool:
        return self.state == _DONE

    @property
    def value(self) -> str:
        return "".join(self.text)

    def feed(self, piece: str) -> str:
        out: list[str] = []
        i, n = 0, len(piece)
        while i < n:
            st = self.state
            c = piece[i]
            if st == _IN:
                j = i
                while j < n and piece[j] not in '"\\':
                    j += 1
                if j > i:
                    self._put(out, piece[i:j])
                    i = j
                    continue
                self.state = _DONE if c == '"' else _ESCAPE
            elif st == _ESCAPE:
                if c == "u":
                    self.state, self.hex = _HEX, ""
                else:
                    self._put(out, _ESC.get(c, c))
                    self.state = _IN
            elif st == _HEX:
                self.hex += c
                if len(self.hex) == 4:
                    self.state = _IN
                    try:
                        self._put(out, chr(int(self.hex, 16)))
                    except ValueError:
                        self.state = _LOST
            elif st == _PRE:  # the opening {"input": " token by token, whitespace between tokens
                token = _OPENING[self.step]
                if c == token[self.pos]:
                    self.pos += 1
                    if self.pos == len(token):
                        self.step, self.pos = self.step + 1, 0
                        if self.step == len(_OPENING):
                            self.state = _IN
                elif self.pos or c not in " \t\r\n":
                    self.state = _LOST
            else:  # _DONE, _LOST: nothing more to read
                break
            i += 1
        return "".join(out)

    def _put(self, out: list[str], text: str) -> None:
        """Append decoded text, pairing UTF-16 surrogates written as two ``\\u`` escapes."""
        if self.high is not None:
            text, self.high = self.high + text, None
        if len(text) == 1 and 0xD800 <= ord(text) <= 0xDBFF:
            self.high = text
            return
        if len(text) >= 2 and 0xD800 <= ord(text[0]) <= 0xDBFF and 0xDC00 <= ord(text[1]) <= 0xDFFF:
            text = chr(0x10000 + ((ord(text[0]) - 0xD800) << 10) + (ord(text[1]) - 0xDC00)) + text[2:]
        self.text.append(text)
        out.append(text)


def input_of(arguments: str) -> str:
    """A custom call's input from its whole argument JSON: the ``input`` string (as far as it
    got, for a call cut short); failing that, the arguments' ``input`` as JSON, or the argument
    text itself."""
    dec = InputDecoder()
    dec.feed(arguments)
    if dec.found:
        return dec.value
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and INPUT_KEY in value:
        v = value[INPUT_KEY]
        return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return arguments


__all__ = ["GrammarError", "INPUT_KEY", "InputDecoder", "check", "input_of", "input_parameters", "json_arguments",
           "json_grammar",
           "raw_grammar", "read_format", "text_grammar"]
