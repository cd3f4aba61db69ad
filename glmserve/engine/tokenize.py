"""Prompt parts to token ids with a Hugging Face tokenizer (no vLLM needed).

Split out of the vLLM engine so that tests can tokenize rendered prompts exactly as the server
does (e.g. the prefix-stability test) without starting an engine.
"""

from __future__ import annotations

import copy
import re
import threading
from array import array
from collections import OrderedDict
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
    each thread encodes with its own copy of the Hugging Face tokenizer -- a fast tokenizer
    shared across threads raises "Already borrowed" when one thread changes a setting
    (``split_special_tokens``) while another encodes -- and the cache is behind a lock.
    """

    def __init__(self, hf: Any, cache_tokens: int = CACHE_TOKENS) -> None:
        self.hf = hf
        self._cache: OrderedDict[str, array] = OrderedDict()
        self._cache_tokens = cache_tokens
        self.cached_tokens = 0
        """Token ids the cache holds now."""
        self.cache_hits = 0
        self._lock = threading.Lock()
        self._per_thread: dict[int, Any] = {threading.get_ident(): hf}  # the creating thread keeps the original
        added = sorted(hf.get_added_vocab().keys(), key=len, reverse=True)
        self._added_re = re.compile("|".join(re.escape(t) for t in added)) if added else None

    def _hf(self) -> Any:
        """This thread's tokenizer (a copy made on a thread's first call)."""
        ident = threading.get_ident()
        tok = self._per_thread.get(ident)
        if tok is None:
            with self._lock:
                tok = self._per_thread[ident] = copy.deepcopy(self.hf)
        return tok

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
        hf = self._hf()
        ids: list[int] = []
        pos = 0
        if self._added_re is not None:
            for m in self._added_re.finditer(text):
                ids += hf.encode(text[pos : m.start()], add_special_tokens=False, split_special_tokens=True) if m.start() > pos else []
                # Spell the look-alike character by character: it reaches the model as text.
                for ch in m.group(0):
                    ids += hf.encode(ch, add_special_tokens=False, split_special_tokens=True)
                pos = m.end()
        if pos < len(text):
            ids += hf.encode(text[pos:], add_special_tokens=False, split_special_tokens=True)
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
        return list(self._hf().encode(text, add_special_tokens=False))
