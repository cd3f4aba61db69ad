"""Images, video, audio and documents sent to a text-only model.

An agent attaches pictures without asking whether the model can see them (Claude Code's
``Read`` of a PNG returns an ``image`` block inside the ``tool_result``; Codex's
``view_image`` does the same), and refusing the request ends the whole session.  So by
default each media part becomes a short note in the prompt saying what was attached (its
media type and size) and that this model cannot see it, which lets the model tell the user;
``--image-input reject`` keeps the 400.  Either way a part whose data is malformed (bad
base64, a media type the API does not define) is the client's 400 naming the field.

One :class:`MediaNotes` per request collects what was replaced, for the response header,
the request log and ``glmserve_media_replaced_total``.  The protocol mappings call
:meth:`MediaNotes.anthropic`, :meth:`MediaNotes.openai_part` and :meth:`MediaNotes.responses_part`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from glmserve.api.errors import APIError
from glmserve.metrics import counted

log = logging.getLogger("glmserve.media")

MEDIA_HEADER = "X-Glmserve-Media-Replaced"
"""How many image / video / audio / document parts of the request became text notes."""

KINDS = ("image", "video", "audio", "document")
"""The metric's label values (never a value taken from a request)."""

ImageInput = Literal["note", "reject"]

ANTHROPIC_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
"""The ``media_type`` values Anthropic's ``image`` block defines."""
AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg"}
"""Chat Completions / Responses ``input_audio.format`` values."""

_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?)(?P<b64>;base64)?,(?P<data>.*)", re.S)


def _b64_size(data: Any, param: str) -> int:
    """Decoded size of base64 ``data``; anything that is not base64 is a 400 naming ``param``."""
    if not isinstance(data, str):
        raise APIError(400, f"{param} must be a base64 string", param=param)
    try:
        return len(base64.b64decode(data.strip(), validate=True))
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param} is not valid base64", param=param) from None


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass
class Attachment:
    kind: str
    """One of :data:`KINDS`."""
    media_type: str | None
    size: int | None
    """Bytes of inline data; None for a URL or a file id (not fetched)."""
    where: str | None = None
    """``URL`` or ``file id`` when the data is not inline."""


def note_text(a: Attachment) -> str:
    """What the model reads in place of the attachment."""
    what = a.media_type or "unknown type"
    if a.size is not None:
        what += f", {a.size} bytes"
    elif a.where:
        what += f", given as a {a.where}"
    return (f"[{_a(a.kind).capitalize()} {a.kind} was attached here ({what}), but this model reads text "
            f"only and cannot see it; if it matters, tell the user it could not be viewed.]")


@dataclass
class MediaNotes:
    """One request's media parts: each becomes a note (``note``) or refuses the request (``reject``)."""

    policy: ImageInput = "note"
    replaced: list[Attachment] = field(default_factory=list)

    # ------------------------------------------------------------------ the one decision

    def replace(self, a: Attachment, param: str) -> str:
        if self.policy == "reject":
            raise APIError(400, f"{param}: {_a(a.kind)} {a.kind} part, but this model accepts text only", param=param)
        self.replaced.append(a)
        return note_text(a)

    # ------------------------------------------------------------------ per protocol

    def anthropic(self, block: dict[str, Any], param: str) -> str:
        """An Anthropic ``image`` or ``document`` block (``param`` names it), validated.  A
        ``document`` whose source is plain text is that text: nothing was lost."""
        kind = block.get("type")
        source = block.get("source")
        if not isinstance(source, dict):
            raise APIError(400, f"{param}.source is required", param=f"{param}.source")
        stype = source.get("type")
        media_type = source.get("media_type")
        if stype == "base64":
            if kind == "image" and media_type not in ANTHROPIC_IMAGE_TYPES:
                raise APIError(400, f"{param}.source.media_type: {media_type!r} is not one of "
                                    f"{', '.join(ANTHROPIC_IMAGE_TYPES)}", param=f"{param}.source.media_type")
            if kind == "document" and not isinstance(media_type, str):
                raise APIError(400, f"{param}.source.media_type is required", param=f"{param}.source.media_type")
            size = _b64_size(source.get("data"), f"{param}.source.data")
            return self.replace(Attachment(str(kind), media_type, size), param)
        if kind == "document" and stype == "text":
            data = source.get("data")
            if not isinstance(data, str):
                raise APIError(400, f"{param}.source.data must be a string", param=f"{param}.source.data")
            return data
        if stype == "url":
            url = source.get("url")
            if not isinstance(url, str) or not url:
                raise APIError(400, f"{param}.source.url is required", param=f"{param}.source.url")
            return self.replace(Attachment(str(kind), media_type, None, "URL"), param)
        if stype == "file":
            return self.replace(Attachment(str(kind), media_type, None, "file id"), param)
        if kind == "document" and stype == "content":
            return self.replace(Attachment("document", None, None, "list of blocks"), param)
        raise APIError(400, f"{param}.source.type: unknown source type {stype!r}", param=f"{param}.source.type")

    @staticmethod
    def _url(kind: str, url: Any, param: str) -> Attachment:
        """An image / video / audio given as a URL (``param`` names it): a ``data:`` URL is
        checked and measured, an http(s) one is not fetched."""
        if not isinstance(url, str) or not url:
            raise APIError(400, f"{param} is required", param=param)
        if url.startswith(("http://", "https://")):
            return Attachment(kind, None, None, "URL")
        if not url.startswith("data:"):
            raise APIError(400, f"{param}: {_a(kind)} {kind} must be given as an http(s) URL or a data: URL", param=param)
        m = _DATA_URL.fullmatch(url)
        if m is None or m.group("b64") is None:
            raise APIError(400, f"{param}: a data URL must be data:<media type>;base64,<data>", param=param)
        media_type = m.group("type")
        if media_type is None or (kind != "document" and not media_type.startswith(kind + "/")):
            raise APIError(400, f"{param}: {media_type!r} is not {_a(kind)} {kind} media type", param=param)
        return Attachment(kind, media_type, _b64_size(m.group("data"), param))

    @staticmethod
    def _audio(audio: Any, param: str) -> Attachment:
        if not isinstance(audio, dict):
            raise APIError(400, f"{param} must be an object with data and format", param=param)
        fmt = audio.get("format")
        if fmt not in AUDIO_FORMATS:
            raise APIError(400, f"{param}.format: {fmt!r} is not one of {', '.join(AUDIO_FORMATS)}",
                           param=f"{param}.format")
        return Attachment("audio", AUDIO_FORMATS[fmt], _b64_size(audio.get("data"), f"{param}.data"))

    @classmethod
    def _file(cls, file: dict[str, Any], data_key: str, param: str) -> Attachment:
        data = file.get(data_key)
        if data is not None:
            url = data if isinstance(data, str) and data.startswith("data:") else f"data:application/octet-stream;base64,{data}"
            return cls._url("document", url, f"{param}.{data_key}")
        return Attachment("document", None, None, "file id" if file.get("file_id") else "URL")

    def openai_part(self, part: dict[str, Any], param: str) -> str | None:
        """A Chat Completions content part that is media (``image_url``, ``input_audio``,
        ``video_url``, ``audio_url``, ``file``, vLLM's ``image`` / ``video`` / ``audio``), as
        its note; None for any other part."""
        kind = part.get("type")
        if kind in ("image_url", "video_url", "audio_url"):
            value = part.get(kind)
            url = value.get("url") if isinstance(value, dict) else value
            field_param = f"{param}.{kind}.url" if isinstance(value, dict) else f"{param}.{kind}"
            return self.replace(self._url(str(kind)[:-4], url, field_param), param)
        if kind in ("image", "video", "audio") and isinstance(part.get(kind), str):
            return self.replace(self._url(str(kind), part[kind], f"{param}.{kind}"), param)
        if kind == "input_audio":
            return self.replace(self._audio(part.get("input_audio"), f"{param}.input_audio"), param)
        if kind == "file":
            file = part.get("file")
            if not isinstance(file, dict):
                raise APIError(400, f"{param}.file must be an object", param=f"{param}.file")
            return self.replace(self._file(file, "file_data", f"{param}.file"), param)
        return None

    def responses_part(self, part: dict[str, Any], param: str) -> str | None:
        """A Responses content part that is media (``input_image``, ``input_audio``,
        ``input_file``), as its note; None for any other part."""
        kind = part.get("type")
        if kind == "input_image":
            if part.get("image_url") is None and part.get("file_id"):
                return self.replace(Attachment("image", None, None, "file id"), param)
            return self.replace(self._url("image", part.get("image_url"), f"{param}.image_url"), param)
        if kind == "input_audio":
            return self.replace(self._audio(part.get("input_audio"), f"{param}.input_audio"), param)
        if kind == "input_file":
            if part.get("file_url") and part.get("file_data") is None:
                return self.replace(Attachment("document", None, None, "URL"), param)
            return self.replace(self._file(part, "file_data", param), param)
        if kind == "image_url":  # the Chat Completions part, sent to /v1/responses by some clients
            return self.openai_part(part, param)
        return None

    # ------------------------------------------------------------------ reporting

    def header(self) -> dict[str, str]:
        return {MEDIA_HEADER: str(len(self.replaced))} if self.replaced else {}

    def report(self, request_id: str, metrics: Any) -> dict[str, Any]:
        """Log and count what was replaced; the request-log fields (empty when nothing was)."""
        if not self.replaced:
            return {}
        if not counted():
            return {"media_replaced": len(self.replaced)}
        for a in self.replaced:
            metrics.media_replaced.labels(a.kind).inc()
        kinds = ", ".join(f"{a.kind} ({a.media_type or 'unknown type'})" for a in self.replaced)
        log.info("request %s: %d media part(s) replaced by a note, this model reads text only: %s", request_id,
                 len(self.replaced), kinds)
        return {"media_replaced": len(self.replaced)}


def remember(request: Any, media: MediaNotes) -> None:
    """Keep the request's count for :func:`add_header` (the route answers after ``prepare``)."""
    if request is not None and media.replaced:
        request.state.media_header = media.header()


def add_header(request: Any, response: Any) -> Any:
    """The :data:`MEDIA_HEADER` on ``response`` when the request's media became notes."""
    response.headers.update(getattr(request.state, "media_header", None) or {})
    return response
