"""xgrammar's EBNF as data, and the two rewrites a custom tool's input grammar needs.

xgrammar turns a client's Lark grammar or regex into its own EBNF (``Grammar.from_lark`` /
``Grammar.from_regex``).  That grammar describes the tool's *input text*; a family places it
where its call format writes the input, which takes one of two rewrites:

* :func:`json_escaped` -- the JSON families (and ChatML) carry the input as a JSON string, so
  the grammar of the text becomes the grammar of its JSON escaping: ``"`` as ``\\"``, ``\\`` as
  ``\\\\``, a newline as ``\\n`` (``\\b \\f \\r \\t`` likewise), other control characters as
  ``\\u00xx``, every other character as itself (``ensure_ascii=False``: how GLM writes JSON).
  A homomorphism: each literal and character class is replaced by its escaped forms, so the
  decoded string is in the grammar's language exactly when the escaped text is in the result's.
* :func:`avoiding` -- the XML families write the input raw up to ``</arg_value>``, so the input
  must not contain that marker (the parser would end the value there).  The grammar is
  intersected with "the marker does not occur": the product of the grammar with the marker's
  KMP automaton (Bar-Hillel), where nonterminal ``A__p_q`` derives what ``A`` derives while the
  automaton goes from state ``p`` to ``q``.  End states are computed first as a least fixpoint,
  so only productive nonterminals are written.  Bounded repetitions are unrolled (at most
  :data:`MAX_UNROLL` copies); lookahead assertions, which only speed xgrammar up, are dropped.

Anything xgrammar writes that is not plain EBNF (``Regex(...)``, from a case-insensitive Lark
terminal) is kept verbatim where no rewrite is needed and refused (:class:`Unsupported`) where
one is.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Union

MAX_CODEPOINT = 0x10FFFF
MAX_UNROLL = 64
"""Copies a bounded repetition may unroll to in :func:`avoiding` (``x{2,5}`` is five)."""


class Unsupported(ValueError):
    """The grammar uses something a rewrite cannot carry (says what)."""


# --------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class Lit:
    text: str


@dataclass(frozen=True)
class Chars:
    """One character out of ``ranges`` (inclusive code point ranges, sorted, disjoint)."""

    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Ref:
    name: str


@dataclass(frozen=True)
class Seq:
    items: tuple["Expr", ...]


@dataclass(frozen=True)
class Alt:
    items: tuple["Expr", ...]


@dataclass(frozen=True)
class Rep:
    item: "Expr"
    lo: int
    hi: int | None


@dataclass(frozen=True)
class Opaque:
    """A built-in xgrammar writes as a call (``Regex("...")``), kept as its text."""

    text: str


Expr = Union[Lit, Chars, Ref, Seq, Alt, Rep, Opaque]
EMPTY = Lit("")


@dataclass
class Grammar:
    rules: dict[str, Expr]
    root: str = "root"
    lookaheads: dict[str, Expr] = field(default_factory=dict)

    def __str__(self) -> str:
        order = [self.root] + [n for n in self.rules if n != self.root]
        lines = []
        for name in order:
            line = f"{name} ::= {show(self.rules[name])}"
            if name in self.lookaheads:
                line += f" (= {show(self.lookaheads[name])})"
            lines.append(line)
        return "\n".join(lines) + "\n"


def seq(items: list[Expr] | tuple[Expr, ...]) -> Expr:
    flat: list[Expr] = []
    for it in items:
        if isinstance(it, Seq):
            flat.extend(it.items)
        elif it != EMPTY:
            flat.append(it)
    return EMPTY if not flat else flat[0] if len(flat) == 1 else Seq(tuple(flat))


def alt(items: list[Expr] | tuple[Expr, ...]) -> Expr:
    out: list[Expr] = []
    for it in items:
        for x in (it.items if isinstance(it, Alt) else (it,)):
            if x not in out:
                out.append(x)
    return out[0] if len(out) == 1 else Alt(tuple(out))


# --------------------------------------------------------------------------- character sets


def _normal(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(r for r in ranges if r[0] <= r[1]):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((a, b) for a, b in out)


def complement(ranges: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    out, nxt = [], 0
    for lo, hi in ranges:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CODEPOINT:
        out.append((nxt, MAX_CODEPOINT))
    return tuple(out)


def minus(ranges: tuple[tuple[int, int], ...], points: set[int]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    cuts = sorted(points)
    for lo, hi in ranges:
        start = lo
        for c in cuts:
            if start <= c <= hi:
                if c > start:
                    out.append((start, c - 1))
                start = c + 1
        if start <= hi:
            out.append((start, hi))
    return tuple(out)


def contains(ranges: tuple[tuple[int, int], ...], c: int) -> bool:
    return any(lo <= c <= hi for lo, hi in ranges)


# --------------------------------------------------------------------------- parsing

_SIMPLE_ESC = {"n": 10, "r": 13, "t": 9, "v": 11, "f": 12, "b": 8, "a": 7, "e": 27, "0": 0}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_RULE_START = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_.\-]*\s*::=")


class _Reader:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def ws(self) -> None:
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif c == "#":
                while self.i < len(self.s) and self.s[self.i] != "\n":
                    self.i += 1
            else:
                break

    def peek(self, k: int = 1) -> str:
        return self.s[self.i:self.i + k]

    def fail(self, what: str) -> Unsupported:
        return Unsupported(f"unreadable EBNF at {self.i} ({what}): {self.s[self.i:self.i + 40]!r}")

    def char(self) -> int:
        """One (possibly escaped) character of a string or class."""
        c = self.s[self.i]
        self.i += 1
        if c != "\\":
            return ord(c)
        e = self.s[self.i]
        self.i += 1
        if e in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[e]
            digits = self.s[self.i:self.i + n]
            if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail("bad escape")
            self.i += n
            return int(digits, 16)
        return _SIMPLE_ESC.get(e, ord(e))


def parse(text: str, root: str = "root") -> Grammar:
    """xgrammar's printed EBNF (``str(xgrammar.Grammar)``) as a :class:`Grammar`."""
    r = _Reader(text)
    g = Grammar(rules={}, root=root)
    r.ws()
    while r.i < len(r.s):
        m = _NAME.match(r.s, r.i)
        if m is None:
            raise r.fail("rule name")
        name = m.group(0)
        r.i = m.end()
        r.ws()
        if r.peek(3) != "::=":
            raise r.fail("::=")
        r.i += 3
        g.rules[name] = _alt(r)
        r.ws()
        if r.peek(2) == "(=":
            r.i += 2
            g.lookaheads[name] = _alt(r)
            r.ws()
            if r.peek() != ")":
                raise r.fail(")")
            r.i += 1
        r.ws()
    if root not in g.rules:
        raise Unsupported(f"the grammar has no {root!r} rule")
    return g


def _alt(r: _Reader) -> Expr:
    items = [_seq(r)]
    while True:
        r.ws()
        if r.peek() != "|":
            return alt(items) if len(items) > 1 else items[0]
        r.i += 1
        items.append(_seq(r))


def _seq(r: _Reader) -> Expr:
    items: list[Expr] = []
    while True:
        r.ws()
        c = r.peek()
        if not c or c in "|)" or r.peek(2) == "(=" or _RULE_START.match(r.s, r.i):
            break
        items.append(_postfix(r, _atom(r)))
    if not items:
        return EMPTY
    return items[0] if len(items) == 1 else Seq(tuple(items))


def _postfix(r: _Reader, e: Expr) -> Expr:
    while True:
        c = r.peek()
        if c == "*":
            r.i += 1
            e = Rep(e, 0, None)
        elif c == "+":
            r.i += 1
            e = Rep(e, 1, None)
        elif c == "?":
            r.i += 1
            e = Rep(e, 0, 1)
        elif c == "{":
            m = re.compile(r"\{\s*(\d+)\s*(?:,\s*(-?\d*)\s*)?\}").match(r.s, r.i)
            if m is None:
                raise r.fail("repetition")
            r.i = m.end()
            lo = int(m.group(1))
            if m.group(2) is None:
                hi: int | None = lo
            else:
                hi = None if m.group(2) in ("", "-1") else int(m.group(2))
            e = Rep(e, lo, hi)
        else:
            return e


def _atom(r: _Reader) -> Expr:
    c = r.peek()
    if c == '"':
        r.i += 1
        chars = []
        while r.peek() != '"':
            if not r.peek():
                raise r.fail("unterminated string")
            chars.append(chr(r.char()))
        r.i += 1
        return Lit("".join(chars))
    if c == "[":
        r.i += 1
        negated = r.peek() == "^"
        if negated:
            r.i += 1
        ranges = []
        while r.peek() != "]":
            if not r.peek():
                raise r.fail("unterminated class")
            lo = r.char()
            hi = lo
            if r.peek() == "-" and r.peek(2) != "-]" and r.s[r.i + 1:r.i + 2] != "]":
                r.i += 1
                hi = r.char()
            ranges.append((lo, hi))
        r.i += 1
        norm = _normal(ranges)
        return Chars(complement(norm) if negated else norm)
    if c == "(":
        r.i += 1
        e = _alt(r)
        r.ws()
        if r.peek() != ")":
            raise r.fail(")")
        r.i += 1
        return e
    m = _NAME.match(r.s, r.i)
    if m is None:
        raise r.fail("expression")
    r.i = m.end()
    if r.peek() == "(":  # a built-in: Regex("..."), TagDispatch(...): kept as text
        start, depth, quoted = m.start(), 0, False
        while r.i < len(r.s):
            ch = r.s[r.i]
            r.i += 1
            if quoted:
                if ch == "\\":
                    r.i += 1
                elif ch == '"':
                    quoted = False
            elif ch == '"':
                quoted = True
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    return Opaque(r.s[start:r.i])
        raise r.fail("unterminated built-in")
    return Ref(m.group(0))


# --------------------------------------------------------------------------- printing


def _esc(c: int, specials: str) -> str:
    ch = chr(c)
    if ch in specials:
        return "\\" + ch
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    if 0x20 <= c < 0x7F:
        return ch
    return f"\\u{c:04x}" if c <= 0xFFFF else f"\\U{c:08x}"


_CLASS_SPECIALS = '\\]-^["'


def show_chars(ranges: tuple[tuple[int, int], ...]) -> str:
    if not ranges:
        raise ValueError("an empty character class matches nothing")
    neg = complement(ranges)
    negated = 0 < len(neg) < len(ranges)
    body = []
    for lo, hi in neg if negated else ranges:
        a = _esc(lo, _CLASS_SPECIALS)
        body.append(a if lo == hi else a + "-" + _esc(hi, _CLASS_SPECIALS))
    return "[" + ("^" if negated else "") + "".join(body) + "]"


def show(e: Expr, inner: bool = False) -> str:
    """EBNF text of an expression (parenthesized where ``inner`` needs a single term)."""
    if isinstance(e, Lit):
        return '"' + "".join(_esc(ord(c), '"\\') for c in e.text) + '"'
    if isinstance(e, Chars):
        return show_chars(e.ranges)
    if isinstance(e, Ref):
        return e.name
    if isinstance(e, Opaque):
        return e.text
    if isinstance(e, Rep):
        body = show(e.item, inner=True)
        if not isinstance(e.item, (Lit, Chars, Ref, Opaque)):
            body = f"({body})" if not body.startswith("(") else body
        if (e.lo, e.hi) == (0, None):
            return body + "*"
        if (e.lo, e.hi) == (1, None):
            return body + "+"
        if (e.lo, e.hi) == (0, 1):
            return body + "?"
        return body + "{" + f"{e.lo}, {-1 if e.hi is None else e.hi}" + "}"
    if isinstance(e, Seq):
        text = " ".join(show(x, inner=True) if not isinstance(x, Seq) else f"({show(x)})" for x in e.items)
        return f"({text})" if inner else text
    if isinstance(e, Alt):
        text = " | ".join(show(x) for x in e.items)
        return f"({text})"
    raise TypeError(e)


# --------------------------------------------------------------------------- JSON escaping

_SHORT = {0x22: '\\"', 0x5C: "\\\\", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t"}
_ESCAPED = set(range(0x20)) | {0x22, 0x5C}


def json_escape(text: str) -> str:
    """``text`` as the inside of a JSON string, as ``json.dumps(ensure_ascii=False)`` writes it."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _escape_expr(e: Expr) -> Expr:
    if isinstance(e, Lit):
        return Lit(json_escape(e.text))
    if isinstance(e, Chars):
        plain = minus(e.ranges, _ESCAPED)
        forms: list[Expr] = [Chars(plain)] if plain else []
        forms += [Lit(_SHORT.get(c, f"\\u{c:04x}")) for c in sorted(_ESCAPED) if contains(e.ranges, c)]
        return alt(forms)
    if isinstance(e, (Ref,)):
        return e
    if isinstance(e, Opaque):
        raise Unsupported(f"{e.text.split('(')[0]} (a case-insensitive terminal?) cannot be written inside a JSON string")
    if isinstance(e, Rep):
        return Rep(_escape_expr(e.item), e.lo, e.hi)
    if isinstance(e, Seq):
        return Seq(tuple(_escape_expr(x) for x in e.items))
    if isinstance(e, Alt):
        return alt([_escape_expr(x) for x in e.items])
    raise TypeError(e)


def json_escaped(g: Grammar) -> Grammar:
    """The grammar of the JSON string bodies whose decoded text ``g`` accepts (see module doc)."""
    return Grammar({n: _escape_expr(e) for n, e in g.rules.items()}, g.root,
                   {n: _escape_expr(e) for n, e in g.lookaheads.items()})


# --------------------------------------------------------------------------- marker avoidance


def _kmp(marker: str) -> list[dict[str, int]]:
    """``delta[p][c]`` for the characters of ``marker``; any other character goes to state 0.
    State ``len(marker)`` means the marker occurred."""
    n = len(marker)
    fail = [0] * (n + 1)
    k = 0
    for i in range(1, n):
        while k and marker[i] != marker[k]:
            k = fail[k]
        if marker[i] == marker[k]:
            k += 1
        fail[i + 1] = k
    delta: list[dict[str, int]] = []
    for p in range(n):
        row = {}
        for c in set(marker):
            q = p
            while q and marker[q] != c:
                q = fail[q]
            row[c] = q + 1 if marker[q] == c else 0
        delta.append(row)
    return delta


def _plus(name: str, e: Expr) -> Expr:
    """``X ::= a X | a`` (how xgrammar writes ``a+``) as ``a a*``: every run of ``a`` then shares
    one starred rule, which the product and :func:`minimised` keep once."""
    if isinstance(e, Alt) and len(e.items) == 2:
        for rec, one in (e.items, e.items[::-1]):
            if rec == Seq((one, Ref(name))) and isinstance(one, (Lit, Chars)):
                return Seq((one, Rep(one, 0, None)))
    return e


class _Normaliser:
    """Repetitions as recursive helper rules (the product needs plain sequences and choices)."""

    def __init__(self, g: Grammar) -> None:
        self.rules: dict[str, Expr] = {}
        self.taken = set(g.rules)
        self.count = 0
        for name, e in g.rules.items():
            self.rules[name] = self.expr(_plus(name, e))

    def fresh(self, body: Expr) -> Ref:
        while True:
            self.count += 1
            name = f"rep__{self.count}"
            if name not in self.taken:
                break
        self.taken.add(name)
        self.rules[name] = body
        return Ref(name)

    def expr(self, e: Expr) -> Expr:
        if isinstance(e, Opaque):
            raise Unsupported(f"{e.text.split('(')[0]} (a case-insensitive terminal?) cannot be kept apart from the "
                              "call format's markers")
        if isinstance(e, Seq):
            return seq([self.expr(x) for x in e.items])
        if isinstance(e, Alt):
            return alt([self.expr(x) for x in e.items])
        if not isinstance(e, Rep):
            return e
        item = self.expr(e.item)
        if not isinstance(item, (Lit, Chars, Ref)):
            item = self.fresh(item)
        extra = None if e.hi is None else e.hi - e.lo
        if e.lo > MAX_UNROLL or (extra is not None and extra > MAX_UNROLL):
            raise Unsupported(f"a repetition {{{e.lo},{e.hi}}} is larger than the {MAX_UNROLL} copies it can be unrolled to")
        head = [item] * e.lo
        if extra is None:  # tail ::= "" | item tail
            name = self.fresh(EMPTY)
            self.rules[name.name] = alt([EMPTY, seq([item, name])])
            return seq(head + [name])
        tail: Expr = EMPTY
        for _ in range(extra):  # nested optionals: ("" | item ("" | item ...))
            tail = self.fresh(alt([EMPTY, seq([item, tail])]))
        return seq(head + [tail])


ANY = -1
"""The end state a caller does not need (what follows resets the automaton, or nothing follows)."""


class _Product:
    """The product of normalised rules with the marker's automaton (see the module doc).

    ``X__p_q`` derives what ``X`` derives while the automaton goes from ``p`` to ``q``;
    ``X__p_x`` the same for any end state.  The latter is all that is written where what
    follows starts with a character that takes every state to the same one (a newline, for
    a marker without one): the end state is then forgotten, which keeps a line of free text
    at one nonterminal per automaton state instead of one per pair of states."""

    def __init__(self, rules: dict[str, Expr], marker: str) -> None:
        self.rules = rules
        self.delta = _kmp(marker)
        self.n = len(marker)
        self.special = {ord(c) for c in marker}
        # characters whose next state depends on the current one
        self.unsafe = {ord(c) for c in set(marker) if len({row[c] for row in self.delta}) > 1}
        self.ends: dict[tuple[str, int], set[int]] = {}
        self.out: dict[str, Expr] = {}
        self.helpers = 0
        self.nullable: dict[str, bool] = {}
        self.risky: dict[str, bool] = {}
        self._first_sets()

    # transitions
    def lit(self, text: str, p: int) -> int | None:
        for c in text:
            p = self.delta[p].get(c, 0)
            if p == self.n:
                return None
        return p

    def chars(self, ranges: tuple[tuple[int, int], ...], p: int) -> dict[int, tuple[tuple[int, int], ...]]:
        groups: dict[int, list[tuple[int, int]]] = defaultdict(list)
        rest = minus(ranges, self.special)
        if rest:
            groups[0].extend(rest)
        for c in sorted(self.special):
            if contains(ranges, c):
                q = self.delta[p][chr(c)]
                if q != self.n:
                    groups[q].append((c, c))
        return {q: _normal(rs) for q, rs in groups.items()}

    # nullable / "may start with an unsafe character" (fixpoints over the rules)
    def _null(self, e: Expr) -> bool:
        if isinstance(e, Lit):
            return not e.text
        if isinstance(e, Chars):
            return False
        if isinstance(e, Ref):
            return self.nullable.get(e.name, False)
        if isinstance(e, Seq):
            return all(self._null(x) for x in e.items)
        return any(self._null(x) for x in e.items)  # Alt

    def _risk(self, e: Expr) -> bool:
        if isinstance(e, Lit):
            return bool(e.text) and ord(e.text[0]) in self.unsafe
        if isinstance(e, Chars):
            return any(contains(e.ranges, c) for c in self.unsafe)
        if isinstance(e, Ref):
            return self.risky.get(e.name, False)
        if isinstance(e, Seq):
            return self.info(e.items)[1]
        return any(self._risk(x) for x in e.items)  # Alt

    def info(self, items: tuple[Expr, ...]) -> tuple[bool, bool]:
        """``(nullable, may start with an unsafe character)`` of a sequence."""
        risky = False
        for x in items:
            risky = risky or self._risk(x)
            if not self._null(x):
                return False, risky
        return True, risky

    def _first_sets(self) -> None:
        changed = True
        while changed:
            changed = False
            for name, e in self.rules.items():
                null, risk = self._null(e), self._risk(e)
                if null != self.nullable.get(name, False) or risk != self.risky.get(name, False):
                    self.nullable[name], self.risky[name] = null, risk
                    changed = True

    # end states (least fixpoint)
    def _reach(self, e: Expr, p: int, seen: set[tuple[str, int]]) -> set[int]:
        if isinstance(e, Lit):
            q = self.lit(e.text, p)
            return set() if q is None else {q}
        if isinstance(e, Chars):
            return set(self.chars(e.ranges, p))
        if isinstance(e, Ref):
            seen.add((e.name, p))
            return set(self.ends.get((e.name, p), ()))
        if isinstance(e, Seq):
            cur = {p}
            for x in e.items:
                cur = set().union(*(self._reach(x, r, seen) for r in cur)) if cur else set()
            return cur
        if isinstance(e, Alt):
            return set().union(*(self._reach(x, p, seen) for x in e.items))
        raise TypeError(e)

    def solve(self, root: str) -> None:
        todo = {(root, 0)}
        while True:
            changed = False
            found: set[tuple[str, int]] = set()
            for name, p in sorted(todo):
                if name not in self.rules:
                    raise Unsupported(f"the grammar uses an undefined rule {name!r}")
                got = self._reach(self.rules[name], p, found)
                if got != self.ends.get((name, p), set()):
                    self.ends[(name, p)] = got
                    changed = True
            if not changed and found <= todo:
                return
            todo |= found

    # product rules
    @staticmethod
    def name(rule: str, p: int, q: int) -> str:
        return f"{rule}__{p}_{'x' if q == ANY else q}"

    def _hoist(self, e: Expr) -> Expr:
        if isinstance(e, (Lit, Chars, Ref)):
            return e
        self.helpers += 1
        name = f"seq__{self.helpers}"
        self.out[name] = e
        return Ref(name)

    def build(self, e: Expr, p: int, need: list[tuple[str, int, bool]], any_end: bool) -> dict[int, Expr]:
        """``{end state: expression}`` for ``e`` run from state ``p``; with ``any_end`` a
        single entry keyed :data:`ANY`."""
        if isinstance(e, Lit):
            q = self.lit(e.text, p)
            return {} if q is None else {ANY if any_end else q: e}
        if isinstance(e, Chars):
            groups = self.chars(e.ranges, p)
            if any_end:
                return {ANY: Chars(_normal([r for rs in groups.values() for r in rs]))} if groups else {}
            return {q: Chars(rs) for q, rs in groups.items()}
        if isinstance(e, Ref):
            ends = sorted(self.ends.get((e.name, p), ()))
            if not ends:
                return {}
            need.append((e.name, p, any_end))
            if any_end:
                return {ANY: Ref(self.name(e.name, p, ANY))}
            return {q: Ref(self.name(e.name, p, q)) for q in ends}
        if isinstance(e, Alt):
            merged: dict[int, list[Expr]] = defaultdict(list)
            for x in e.items:
                for q, y in self.build(x, p, need, any_end).items():
                    merged[q].append(y)
            return {q: alt(ys) for q, ys in merged.items()}
        if isinstance(e, Seq):
            return self._seq(e.items, p, need, any_end)
        raise TypeError(e)

    def _seq(self, items: tuple[Expr, ...], p: int, need: list[tuple[str, int, bool]], any_end: bool) -> dict[int, Expr]:
        cur: dict[int, Expr] = {p: EMPTY}
        for i, x in enumerate(items):
            rest = items[i + 1:]
            rest_null, rest_risky = self.info(rest)
            last = not rest
            # forget the end state when nobody needs it: the next character resets the automaton
            # whatever it was (and, when what follows may be empty, the caller does not need it)
            forget = (last and any_end) or (not last and not rest_risky and (not rest_null or any_end))
            nxt: dict[int, list[Expr]] = defaultdict(list)
            for r, pre in cur.items():
                outs = self.build(x, r, need, forget)
                if len(outs) > 1:
                    pre = self._hoist(pre)  # one copy of the prefix, however many ends follow
                for q, y in outs.items():
                    nxt[q].append(seq([pre, y]))
            if not nxt:
                return {}
            if forget and not last:
                cur = {0: alt(nxt[ANY])}  # any state: the next character moves them all alike
            else:
                cur = {q: alt(ys) for q, ys in nxt.items()}
        return cur

    def grammar(self, root: str) -> Grammar:
        self.solve(root)
        if not self.ends.get((root, 0)):
            raise Unsupported("every text of this grammar contains the call format's marker")
        need: list[tuple[str, int, bool]] = [(root, 0, True)]
        done: set[tuple[str, int, bool]] = set()
        while need:
            item = need.pop()
            if item in done:
                continue
            done.add(item)
            name, p, any_end = item
            built = self.build(self.rules[name], p, need, any_end)
            if not any_end and set(built) != self.ends[(name, p)]:  # pragma: no cover - a bug, not input
                raise AssertionError(f"product of {name} from {p}: {sorted(built)} != {sorted(self.ends[(name, p)])}")
            for q, body in built.items():
                self.out[self.name(name, p, q)] = body
        return minimised(Grammar({"root": Ref(self.name(root, 0, ANY)), **self.out}, "root"))


def _rename(e: Expr, names: dict[str, str]) -> Expr:
    if isinstance(e, Ref):
        return Ref(names.get(e.name, e.name))
    if isinstance(e, Seq):
        return Seq(tuple(_rename(x, names) for x in e.items))
    if isinstance(e, Alt):
        return alt([_rename(x, names) for x in e.items])
    if isinstance(e, Rep):
        return Rep(_rename(e.item, names), e.lo, e.hi)
    return e


def minimised(g: Grammar) -> Grammar:
    """Rules that derive alike merged (partition refinement: equal bodies once every reference
    is read as its rule's class), so each distinct run of free text is compiled once, however
    many times the source grammar spelled it out."""
    rules = g.rules
    cls = {n: 0 for n in rules}
    while True:
        names = {n: f"#{c}" for n, c in cls.items()}
        sig = {n: show(_rename(e, names)) for n, e in rules.items()}
        ids: dict[tuple[int, str], int] = {}
        new = {n: ids.setdefault((cls[n], sig[n]), len(ids)) for n in rules}
        if len(ids) == len(set(cls.values())):
            break
        cls = new
    keep: dict[int, str] = {}
    for n in rules:
        keep.setdefault(cls[n], n)
    keep[cls[g.root]] = g.root
    alias = {n: keep[cls[n]] for n in rules}
    return Grammar({n: _rename(e, alias) for n, e in rules.items() if alias[n] == n}, g.root,
                   {n: _rename(e, alias) for n, e in g.lookaheads.items() if alias[n] == n})


def avoiding(g: Grammar, marker: str) -> Grammar:
    """The texts of ``g`` in which ``marker`` does not occur (see module doc)."""
    norm = _Normaliser(g)
    return _Product(norm.rules, marker).grammar(g.root)


__all__ = ["Grammar", "Unsupported", "avoiding", "json_escape", "json_escaped", "parse", "show"]
