"""Images, video, audio and documents sent to a text-only model.

An agent attaches pictures without asking whether the model can see them (Claude Code's
``Read`` of a PNG returns an ``image`` block inside the ``tool_result``; Codex's
``view_image`` does the same), and refusing the request ends the whole session.  So by
default each media part becomes a short note in the prompt saying what was attached (its
media type and size) and that this model cannot see it, which lets the model tell the user;
``--image-input reject`` keeps the 400 (decided before any data is looked at).  Either way a
part whose data is malformed (bad base64, a media type the API does not define) is the
client's 400 naming the field.

The note is written from a fixed vocabulary only: its kind, a media type from
:data:`MEDIA_TYPES` (any other is an "unknown type"), a byte count, "URL" or "file id".
No text of the request ever reaches it, so a crafted media type cannot forge what the model reads.

Nothing here decodes base64: the size of inline data is computed from its length once its
alphabet and padding are checked (:func:`b64_size`, one C-speed pass, ~3 ms for 8 MiB, where
decoding took ~40 ms of the event loop); data the server stored itself (a Responses history,
validated when first sent) is only measured (:func:`b64_length`, constant time), however often
a conversation resends it.

One :class:`MediaNotes` per request collects what was replaced, for the response header,
the request log and ``glmserve_media_replaced_total``.  The protocol mappings call
:meth:`MediaNotes.inline` / :meth:`MediaNotes.replace` (Anthropic's typed blocks, in
:mod:`glmserve.api.anthropic.mapping`), :meth:`MediaNotes.openai_part` and
:meth:`MediaNotes.responses_part`.
"""

from __future__ import annotations

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

AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg"}
"""Chat Completions / Responses ``input_audio.format`` values."""

MEDIA_TYPES: dict[str, frozenset[str]] = {
    "image": frozenset({"image/jpeg", "image/png", "image/gif", "image/webp", "image/bmp", "image/tiff",
                        "image/svg+xml", "image/heic", "image/heif", "image/avif"}),
    "video": frozenset({"video/mp4", "video/webm", "video/quicktime", "video/mpeg", "video/ogg", "video/x-msvideo"}),
    "audio": frozenset({"audio/wav", "audio/x-wav", "audio/mpeg", "audio/mp3", "audio/ogg", "audio/flac", "audio/webm",
                        "audio/mp4", "audio/aac"}),
    "document": frozenset({"application/pdf", "text/plain", "text/markdown", "text/html", "text/csv", "application/json",
                           "application/msword", "application/rtf",
                           "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                           "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                           "application/vnd.openxmlformats-officedocument.presentationml.presentation",
                           "application/octet-stream"}),
}
"""The media types a note may name, per kind: the fixed vocabulary the model reads."""

_DATA_HEADER = re.compile(r"(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?)(?P<b64>;base64)?")
_HEADER_MAX = 512
"""A ``data:`` URL's header (``data:<type>;<params>;base64,``) is looked for within this many characters."""
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64_size(data: Any, param: str) -> int:
    """Decoded size of base64 ``data``, without decoding it: what ``b64decode(data.strip(),
    validate=True)`` accepts (the alphabet, ``=`` padding only at the end, whole quanta), checked
    in one pass at C speed (``bytes.translate``), the size computed from the length.  Anything
    else is a 400 naming ``param``."""
    if not isinstance(data, str):
        raise APIError(400, f"{param} must be a base64 string", param=param)
    data = data.strip()
    if data.isascii():
        raw = data.encode("ascii")
        rest = raw.translate(None, _B64_ALPHABET)  # what is not in the alphabet: at most the padding
        if len(raw) % 4 == 0 and len(rest) <= 2 and rest == b"=" * len(rest) and raw.endswith(rest):
            return len(raw) // 4 * 3 - len(rest)
    raise APIError(400, f"{param} is not valid base64", param=param)


def b64_length(data: str) -> int:
    """Decoded size of base64 this server already validated (stored history): from the
    length and the padding alone, in constant time."""
    data = data.strip()
    return len(data) // 4 * 3 - (len(data) - len(data.rstrip("=")) if data.endswith("=") else 0)


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass
class Attachment:
    kind: str
    """One of :data:`KINDS`."""
    media_type: str | None
    """One of :data:`MEDIA_TYPES` for the kind, or None (not given, or not one the note may name)."""
    size: int | None
    """Bytes of inline data; None for a URL or a file id (not fetched)."""
    where: str | None = None
    """``URL`` or ``file id`` when the data is not inline."""

    def __post_init__(self) -> None:
        assert self.kind in KINDS and self.where in (None, "URL", "file id")
        named = self.media_type.lower() if self.media_type is not None else None
        self.media_type = named if named in MEDIA_TYPES[self.kind] else None


def note_text(a: Attachment) -> str:
    """What the model reads in place of the attachment: words of a fixed vocabulary and numbers."""
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
    trusted: bool = False
    """Set while the parts come from the server's own store (a Responses history): their data
    was validated when first sent, so it is only measured (:func:`b64_length`)."""

    # ------------------------------------------------------------------ the one decision

    def refuse(self, kind: str, param: str) -> None:
        """``reject``: the 400, before any of the part's data is looked at."""
        if self.policy == "reject":
            raise APIError(400, f"{param}: {_a(kind)} {kind} part, but this model accepts text only", param=param)

    def replace(self, a: Attachment, param: str) -> str:
        self.refuse(a.kind, param)
        self.replaced.append(a)
        return note_text(a)

    def size(self, data: Any, param: str) -> int:
        """Decoded bytes of a part's base64 ``data``, validated unless :attr:`trusted`."""
        return b64_length(data) if self.trusted and isinstance(data, str) else b64_size(data, param)

    def inline(self, kind: str, media_type: str | None, data: Any, data_param: str, param: str) -> str:
        """A part with base64 ``data`` (``data_param`` names it), as its note."""
        self.refuse(kind, param)
        return self.replace(Attachment(kind, media_type, self.size(data, data_param)), param)

    # ------------------------------------------------------------------ per protocol

    def _url(self, kind: str, url: Any, param: str) -> Attachment:
        """An image / video / audio / document given as a URL (``param`` names it): a ``data:``
        URL is checked and measured, an http(s) one is not fetched."""
        if not isinstance(url, str) or not url:
            raise APIError(400, f"{param} is required", param=param)
        if url.startswith(("http://", "https://")):
            return Attachment(kind, None, None, "URL")
        if not url.startswith("data:"):
            raise APIError(400, f"{param}: {_a(kind)} {kind} must be given as an http(s) URL or a data: URL", param=param)
        comma = url.find(",", 5, _HEADER_MAX)
        m = _DATA_HEADER.fullmatch(url, 5, comma) if comma >= 0 else None
        if m is None or m.group("b64") is None:
            raise APIError(400, f"{param}: a data URL must be data:<media type>;base64,<data>", param=param)
        media_type = m.group("type")
        if media_type is None or (kind != "document" and not media_type.lower().startswith(kind + "/")):
            raise APIError(400, f"{param}: {media_type!r} is not {_a(kind)} {kind} media type", param=param)
        return Attachment(kind, media_type, self.size(url[comma + 1:], param))

    def _audio(self, audio: Any, param: str) -> Attachment:
        if not isinstance(audio, dict):
            raise APIError(400, f"{param} must be an object with data and format", param=param)
        fmt = audio.get("format")
        if fmt not in AUDIO_FORMATS:
            raise APIError(400, f"{param}.format: {fmt!r} is not one of {', '.join(AUDIO_FORMATS)}",
                           param=f"{param}.format")
        return Attachment("audio", AUDIO_FORMATS[fmt], self.size(audio.get("data"), f"{param}.data"))

    def _file(self, file: dict[str, Any], data_key: str, param: str) -> Attachment:
        data = file.get(data_key)
        if data is None:
            return Attachment("document", None, None, "file id" if file.get("file_id") else "URL")
        if isinstance(data, str) and data.startswith("data:"):
            return self._url("document", data, f"{param}.{data_key}")
        return Attachment("document", "application/octet-stream", self.size(data, f"{param}.{data_key}"))

    def openai_part(self, part: dict[str, Any], param: str) -> str | None:
        """A Chat Completions content part that is media (``image_url``, ``input_audio``,
        ``video_url``, ``audio_url``, ``file``, vLLM's ``image`` / ``video`` / ``audio``), as
        its note; None for any other part."""
        kind = part.get("type")
        if kind in ("image_url", "video_url", "audio_url"):
            self.refuse(kind[:-4], param)
            value = part.get(kind)
            url = value.get("url") if isinstance(value, dict) else value
            field_param = f"{param}.{kind}.url" if isinstance(value, dict) else f"{param}.{kind}"
            return self.replace(self._url(kind[:-4], url, field_param), param)
        if kind in ("image", "video", "audio") and isinstance(part.get(kind), str):
            self.refuse(kind, param)
            return self.replace(self._url(kind, part[kind], f"{param}.{kind}"), param)
        if kind == "input_audio":
            self.refuse("audio", param)
            return self.replace(self._audio(part.get("input_audio"), f"{param}.input_audio"), param)
        if kind == "file":
            self.refuse("document", param)
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
            self.refuse("image", param)
            if part.get("image_url") is None and part.get("file_id"):
                return self.replace(Attachment("image", None, None, "file id"), param)
            return self.replace(self._url("image", part.get("image_url"), f"{param}.image_url"), param)
        if kind == "input_audio":
            self.refuse("audio", param)
            return self.replace(self._audio(part.get("input_audio"), f"{param}.input_audio"), param)
        if kind == "input_file":
            self.refuse("document", param)
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
