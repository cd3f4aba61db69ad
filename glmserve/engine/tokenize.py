"""Prompt parts to token ids with a Hugging Face tokenizer (no vLLM needed).

Split out of the vLLM engine so that tests can tokenize rendered prompts exactly as the server
does (e.g. the prefix-stability test) without starting an engine.
"""

from __future__ import annotations

import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from glmserve.formats.base import Control


CACHE_MIN_CHARS = 256
CACHE_TOKENS = 1 << 20
"""The cache holds at most this many token ids in all (4 bytes each), whatever the number of entries."""


class PromptTokenizer:
    """Control tokens become their ids; all other text is plain text (no added token may form).

    The text between two control tokens is tokenized on its own, so a segment that comes back
    unchanged -- an agent's 15K-token system prompt, the tool block, earlier tool results, resent
    every turn -- is looked up instead of tokenized again (an LRU of the longer segments; measured
    on a 19K-token agent prompt: tokenizing is most of glmserve's own time per request).  The
    cache is bounded by the tokens it holds (``cache_tokens``), not by its entries, and
    :meth:`encode_parts` fills it only for a prompt within ``cache_within`` tokens: a prompt the
    context check will refuse leaves the cache as it was.

    Safe to call from several threads (the pipeline tokenizes long prompts off the event loop):
    plain text is encoded by a copy of the fast tokenizer's Rust backend, made once, set once
    (``encode_special_tokens``) and never changed after, through ``encode_batch`` -- what
    ``hf.encode(text, add_special_tokens=False, split_special_tokens=True)`` runs, without its
    Python-side bookkeeping -- which releases the GIL while it works (``Tokenizer.encode`` does
    not).  The shared tokenizer itself is left alone: flipping its ``split_special_tokens`` while
    another thread encodes with it raises "Already borrowed".  The cache is behind a lock.
    """

    def __init__(self, hf: Any, cache_tokens: int = CACHE_TOKENS) -> None:
        self.hf = hf
        self._cache: OrderedDict[str, array] = OrderedDict()
        self._cache_tokens = cache_tokens
        self.cached_tokens = 0
        """Token ids the cache holds now."""
        self.cache_hits = 0
        self._lock = threading.Lock()
        self._encode = self._encoder(hf, special_as_text=True)
        self._encode_raw = self._encoder(hf, special_as_text=False)
        added = sorted(hf.get_added_vocab().keys(), key=len, reverse=True)
        self._added_re = re.compile("|".join(re.escape(t) for t in added)) if added else None
        self._chars_per_token = _chars_per_token(hf)

    def _encoder(self, hf: Any, special_as_text: bool) -> Callable[[str], list[int]]:
        """``text -> ids``, callable from any thread: plain text (``special_as_text``: no added
        token may form), or a raw prompt (added tokens recognised, as ``hf.encode(text,
        add_special_tokens=False)`` does)."""
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:  # no Rust backend: the tokenizer itself, one thread at a time
            def encode_locked(text: str) -> list[int]:
                with self._lock:
                    return list(hf.encode(text, add_special_tokens=False, split_special_tokens=special_as_text))
            return encode_locked
        from tokenizers import Tokenizer

        own = Tokenizer.from_str(backend.to_str())
        own.encode_special_tokens = special_as_text  # True: an added token's text is text here

        def encode(text: str) -> list[int]:
            return own.encode_batch([text], add_special_tokens=False)[0].ids
        return encode

    def min_tokens(self, chars: int) -> int:
        """A lower bound on the tokens of any text of ``chars`` characters: no token covers more
        than :func:`_chars_per_token` of them (0 when that is not known)."""
        return chars // self._chars_per_token if self._chars_per_token else 0

    def token_id(self, token: str) -> int | None:
        tid = self.hf.convert_tokens_to_ids(token)
        # an unknown token maps to unk, whose id may be a real token's (SmolLM2: 0 is <|endoftext|>)
        if tid is None or self.hf.convert_ids_to_tokens(int(tid)) != token:
            return None
        return int(tid)

    def encode_segment(self, text: str, fresh: list[tuple[str, array]] | None = None) -> list[int] | array:
        """:meth:`encode_plain`, from the cache for a long segment seen before (do not mutate the
        result).  A long segment not in the cache is appended to ``fresh`` for :meth:`remember`
        (with ``fresh`` None it is remembered at once)."""
        if len(text) < CACHE_MIN_CHARS or not self._cache_tokens:
            return self.encode_plain(text)
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                self.cache_hits += 1
                return hit
        ids = array("i", self.encode_plain(text))
        if fresh is None:
            self.remember([(text, ids)])
        else:
            fresh.append((text, ids))
        return ids

    def remember(self, segments: list[tuple[str, array]]) -> None:
        """Cache ``segments``, evicting the least recently used until the cache holds at most
        ``cache_tokens`` ids (a segment larger than that is not cached)."""
        with self._lock:
            for text, ids in segments:
                if len(ids) > self._cache_tokens or text in self._cache:
                    continue
                self._cache[text] = ids
                self.cached_tokens += len(ids)
                while self.cached_tokens > self._cache_tokens:
                    _, old = self._cache.popitem(last=False)
                    self.cached_tokens -= len(old)

    def encode_plain(self, text: str) -> list[int]:
        """Plain text: no added token (special or not) may be formed from it."""
        if not text:
            return []
        encode = self._encode
        ids: list[int] = []
        pos = 0
        if self._added_re is not None:
            for m in self._added_re.finditer(text):
                ids += encode(text[pos : m.start()]) if m.start() > pos else []
                # Spell the look-alike character by character: it reaches the model as text.
                for ch in m.group(0):
                    ids += encode(ch)
                pos = m.end()
        if pos < len(text):
            ids += encode(text[pos:])
        return ids

    def encode_parts(self, parts: list[Any], cache_within: int | None = None) -> list[int]:
        """Ids of a rendered :class:`~glmserve.formats.base.Prompt`'s parts.  Its new long
        segments are cached only if the prompt is at most ``cache_within`` tokens (None: always)."""
        ids: list[int] = []
        buf: list[str] = []
        fresh: list[tuple[str, array]] = []
        for part in parts:
            if isinstance(part, Control):
                tid = self.token_id(part.token)
                if tid is None:  # not a token of this vocabulary: template text then
                    buf.append(part.token)
                    continue
                ids += self.encode_segment("".join(buf), fresh)
                buf.clear()
                ids.append(tid)
            else:
                buf.append(part)
        ids += self.encode_segment("".join(buf), fresh)
        if fresh and (cache_within is None or len(ids) <= cache_within):
            self.remember(fresh)
        return ids

    def encode_raw(self, text: str) -> list[int]:
        """A raw completion prompt (special tokens recognised), from any thread (a long one is
        tokenized off the event loop, as a chat prompt is)."""
        return self._encode_raw(text) if text else []


_TOKEN_CHARS_MARGIN = 4
"""Headroom on the longest vocabulary entry: a normalizer that composes characters (NFC: at
most three into one, which is then at least two bytes) makes a token cover a little more of
the input than its own length."""


def _chars_per_token(hf: Any) -> int | None:
    """The most characters of input one token can stand for, with :data:`_TOKEN_CHARS_MARGIN`:
    the longest vocabulary entry (as its token string: byte-level entries are a character per
    byte, so at least as long as the text they match).  None -- no bound -- for a tokenizer
    whose normalizer could shrink the input further (one that strips or replaces characters),
    or one without a Rust backend to tell."""
    import json

    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        return None
    normalizer = json.loads(backend.to_str()).get("normalizer")
    steps = normalizer.get("normalizers", []) if normalizer and normalizer.get("type") == "Sequence" else \
        [normalizer] if normalizer else []
    if any(step.get("type") not in ("NFC", "NFKC") for step in steps):
        return None
    longest = max((len(t) for t in hf.get_vocab()), default=0)
    return longest * _TOKEN_CHARS_MARGIN if longest else None
