"""Prompt parts to token ids with a Hugging Face tokenizer (no vLLM needed).

Split out of the vLLM engine so that tests can tokenize rendered prompts exactly as the server
does (e.g. the prefix-stability test) without starting an engine.
"""

from __future__ import annotations

import re
from typing import Any

from glmserve.formats.base import Control


class PromptTokenizer:
    """Control tokens become their ids; all other text is plain text (no added token may form)."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        added = sorted(hf.get_added_vocab().keys(), key=len, reverse=True)
        self._added_re = re.compile("|".join(re.escape(t) for t in added)) if added else None

    def token_id(self, token: str) -> int | None:
        tid = self.hf.convert_tokens_to_ids(token)
        # an unknown token maps to unk, whose id may be a real token's (SmolLM2: 0 is <|endoftext|>)
        if tid is None or self.hf.convert_ids_to_tokens(int(tid)) != token:
            return None
        return int(tid)

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
                ids += self.encode_plain("".join(buf))
                buf.clear()
                ids.append(tid)
            else:
                buf.append(part)
        ids += self.encode_plain("".join(buf))
        return ids

    def encode_raw(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))
