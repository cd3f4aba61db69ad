"""Chat formats, one module per model family.

Adding a family means adding one module with a :class:`ChatFormat` subclass and one line
in ``FORMATS``.
"""

from __future__ import annotations

import importlib
import json
import re
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
    "glm51": "glmserve.formats.glm51:GLM51Format",
    "glm53": "glmserve.formats.glm53:GLM53Format",
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

    # the model's own name only (a parent directory's name says nothing)
    own_name = " ".join(Path(str(n)).name.lower() for n in (cfg.get("_name_or_path"), model_dir) if n)
    glm5 = _detect_glm5(arch, own_name, template)
    if glm5 is not None:
        return glm5
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


GLM5_ARCHITECTURES = ("GlmMoeDsaForCausalLM", "Glm5NextForConditionalGeneration")
_GLM5_NAME = re.compile(r"glm[-_]?5(?:\.(\d+))?(?!\d)")


def _detect_glm5(arch: str, name_hint: str, template: str) -> tuple[str, str] | None:
    """The GLM-5.x family, or None for an older model.

    GLM-5 / 5.1 / 5.2 share the architecture ``GlmMoeDsaForCausalLM`` and GLM-5.3-Flash is
    ``Glm5NextForConditionalGeneration``, so the template's markers (then the model name)
    tell the 5.x releases apart: GLM-5.3 writes a ``Reasoning Effort`` line and reorders
    tool results by id, GLM-5.2 writes the line but keeps 5.1's rules, GLM-5.1 knows
    ``defer_loading`` / ``tool_reference``, GLM-5 renders exactly as GLM-4.7.
    """
    found = [a for a in GLM5_ARCHITECTURES if a in arch]
    name = _GLM5_NAME.search(name_hint)
    glm5_template = "<arg_key>" in template and any(
        m in template for m in ("Reasoning Effort", "defer_loading", "tool_reference"))
    if not found and name is None and not glm5_template:
        return None
    why = f"architecture {found[0]}" if found else f"model name {name.group(0)!r}" if name else f"architecture {arch or '?'}"
    if "Reasoning Effort" in template:
        if "tool_call_id" in template and "tool_calls" in template and ("block_start" in template or "sort" in template):
            return "glm53", f"{why}; the chat template writes a Reasoning Effort line and orders tool results by id (GLM-5.3)"
        return "glm51", (f"{why}; the chat template writes a Reasoning Effort line with GLM-5.1's rules (GLM-5.2: served "
                         "as glm51, its closest family, without the effort line)")
    if "defer_loading" in template or "tool_reference" in template:
        return "glm51", f"{why}; the chat template knows defer_loading / tool_reference (GLM-5.1)"
    minor = name.group(1) if name else None
    if minor is None and "Glm5NextForConditionalGeneration" in arch:
        return "glm53", f"{why} (GLM-5.3-Flash)"
    if minor is not None and int(minor) >= 3:
        return "glm53", f"{why} (GLM-5.{minor})"
    if minor in ("1", "2"):
        note = " (GLM-5.2: served as glm51, its closest family, without the effort line)" if minor == "2" else ""
        return "glm51", f"{why} (GLM-5.{minor}){note}"
    if template and "<arg_key>" not in template:
        return None  # a GLM-5 name on some other template: judge by the template
    return "glm47", f"{why} and a template without GLM-5.1's markers: GLM-5, which renders exactly as GLM-4.7"


__all__ = ["FORMATS", "ChatFormat", "detect_format", "get_format"]
