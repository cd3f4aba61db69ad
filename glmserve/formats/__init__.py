"""Chat formats, one module per model family.

Adding a family means adding one module with a :class:`ChatFormat` subclass and one line
in ``FORMATS``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from glmserve.formats.base import ChatFormat

FORMATS: dict[str, str] = {
    "chatml": "glmserve.formats.chatml:ChatMLFormat",
    "glm4": "glmserve.formats.glm4:GLM4Format",
    "glm4-0414": "glmserve.formats.glm4_0414:GLM40414Format",
    "glmz1": "glmserve.formats.glmz1:GLMZ1Format",
    "glm45": "glmserve.formats.glm45:GLM45Format",
    "glm47": "glmserve.formats.glm47:GLM47Format",
}


def get_format(name: str) -> ChatFormat:
    try:
        target = FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown chat format {name!r}; choose one of {', '.join(FORMATS)}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)()


def detect_format(
    model_dir: str | Path | None,
    vocab: set[str] | None = None,
    architectures: list[str] | None = None,
    chat_template: str | None = None,
) -> tuple[str, str]:
    """Pick a format from a model's config and tokenizer; returns ``(name, reason)``.

    ``model_dir`` may also be a Hugging Face id (then only its name is used, with the
    ``architectures`` and ``chat_template`` the engine loaded).  The chat template shipped
    with the model is the best witness of its family, so its markers are checked first;
    the architecture is the fallback.
    """
    cfg: dict[str, Any] = {"architectures": architectures} if architectures else {}
    template = chat_template or ""
    if model_dir is not None and Path(model_dir).is_dir():
        d = Path(model_dir)
        for fname in ("config.json",):
            if (d / fname).is_file():
                cfg = json.loads((d / fname).read_text())
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        elif (d / "tokenizer_config.json").is_file():
            tc = json.loads((d / "tokenizer_config.json").read_text())
            t = tc.get("chat_template") or ""
            template = t if isinstance(t, str) else json.dumps(t)
    arch = " ".join(cfg.get("architectures") or [])
    name_hint = str(cfg.get("_name_or_path", "")).lower() + " " + str(model_dir or "").lower()
    vocab = vocab or set()

    if "<arg_key>" in template or "<arg_key>" in vocab:
        if "<tool_call>{{" in template.replace(" ", "") and "\n<arg_key>" not in template:
            return "glm47", "chat template writes <arg_key> without newlines (GLM-4.7)"
        if "4.7" in name_hint:
            return "glm47", "model name says 4.7 and the tokenizer has <arg_key>"
        return "glm45", "tokenizer/template has <arg_key> (GLM-4.5/4.6 XML tool calls)"
    if "<|user|>" in template or "<|user|>" in vocab or "Glm" in arch or "ChatGLM" in arch:
        if "z1" in name_hint or "<think>" in template:
            return "glmz1", "GLM template with <think> (GLM-Z1 reasoning)"
        if "Glm4ForCausalLM" in arch or "0414" in name_hint:
            return "glm4-0414", f"architecture {arch or '?'} (GLM-4-0414 layout)"
        return "glm4", f"architecture {arch or '?'} with GLM role tokens (glm-4-9b-chat layout)"
    if "<|im_start|>" in template or "<|im_start|>" in vocab:
        return "chatml", "chat template / tokenizer uses <|im_start|> (ChatML)"
    return "chatml", "no GLM markers found; ChatML is the fallback"


__all__ = ["FORMATS", "ChatFormat", "detect_format", "get_format"]
