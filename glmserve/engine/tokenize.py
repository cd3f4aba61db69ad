"""Prompt parts to token ids with a Hugging Face tokenizer (no vLLM needed).

Split out of the vLLM engine so that tests can tokenize rendered prompts exactly as the server
does (e.g. the prefix-stability test) without starting an engine.
"""

from __future__ import annotations

import re
from array import array
from collections import OrderedDict
from typing import Any

from glmserve.formats.base import Control


CACHE_MIN_CHARS = 256
CACHE_ENTRIES = 128


class PromptTokenizer:
    """Control tokens become their ids; all other text is plain text (no added token may form).

    The text between two control tokens is tokenized on its own, so a segment that comes back
    unchanged -- an agent's 15K-token system prompt, the tool block, earlier tool results, resent
    every turn -- is looked up instead of tokenized again (an LRU of the longer segments; measured
    on a 19K-token agent prompt: tokenizing is most of glmserve's own time per request).
    """

    def __init__(self, hf: Any, cache_entries: int = CACHE_ENTRIES) -> None:
        self.hf = hf
        self._cache: OrderedDict[str, array] = OrderedDict()
        self._cache_entries = cache_entries
        self.cache_hits = 0
        added = sorted(hf.get_added_vocab().keys(), key=len, reverse=True)
        self._added_re = re.compile("|".join(re.escape(t) for t in added)) if added else None

    def token_id(self, token: str) -> int | None:
        tid = self.hf.convert_tokens_to_ids(token)
        # an unknown token maps to unk, whose id may be a real token's (SmolLM2: 0 is <|endoftext|>)
        if tid is None or self.hf.convert_ids_to_tokens(int(tid)) != token:
            return None
        return int(tid)

    def encode_segment(self, text: str) -> list[int] | array:
        """:meth:`encode_plain`, from the cache for a long segment seen before (do not mutate the result)."""
        if len(text) < CACHE_MIN_CHARS or not self._cache_entries:
            return self.encode_plain(text)
        hit = self._cache.get(text)
        if hit is not None:
            self._cache.move_to_end(text)
            self.cache_hits += 1
            return hit
        ids = array("l", self.encode_plain(text))
        self._cache[text] = ids
        if len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)
        return ids

    def encode_plain(self, text: str) -> list[int]:
        """Plain text: no added token (special or not) may be formed from it."""
        if not text:
            return []
        hf = self.hf
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

    def encode_parts(self, parts: list[Any]) -> list[int]:
        """Ids of a rendered :class:`~glmserve.formats.base.Prompt`'s parts."""
        ids: list[int] = []
        buf: list[str] = []
        for part in parts:
            if isinstance(part, Control):
                tid = self.token_id(part.token)
                if tid is None:  # not a token of this vocabulary: template text then
                    buf.append(part.token)
                    continue
                ids += self.encode_segment("".join(buf))
                buf.clear()
                ids.append(tid)
            else:
                buf.append(part)
        ids += self.encode_segment("".join(buf))
        return ids

    def encode_raw(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))
