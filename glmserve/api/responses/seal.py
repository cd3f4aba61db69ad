"""``encrypted_content`` for reasoning items: the model's reasoning, sealed by this server.

Clients that keep no server-side state (Codex CLI sends ``store: false`` with
``include: ["reasoning.encrypted_content"]``) carry the reasoning of earlier turns back as an
opaque token.  glmserve seals the reasoning text with authenticated encryption (Fernet:
AES-128-CBC + HMAC-SHA256) under a key derived from the server secret
(:mod:`glmserve.server_secret`), so a token survives a restart and is accepted by every
replica that shares the secret.

What the seal gives, exactly: the sealed copy cannot be read without the secret
(confidentiality) and cannot be forged or altered (integrity).  It does not hide the
reasoning from the client: the same item also carries the reasoning in plain text
(``content``, ``reasoning_text``), as OpenAI's Responses API does for open models.

What is verified when an item comes back in a request's ``input``
(:func:`glmserve.api.responses.mapping.items_to_messages`): the seal, and only the seal.  A
seal that opens (under the current or a previous secret) gives the reasoning, and any plain
text beside it is ignored; a seal that does not open (altered, forged, or sealed under a
secret this server no longer has) drops the item's reasoning, plain text included; an item
with plain text and no seal is dropped too (nothing proves this server wrote it).  The one
other source of reasoning history is the server's own store (``previous_response_id``), whose
rows this server wrote.  So the model's reasoning history is always text this server, or one
sharing its secret, produced -- which says where the text came from, not that the model
"meant" it: a replayed seal is accepted wherever the client puts it in the conversation.
"""

from __future__ import annotations

import json

from cryptography.fernet import InvalidToken

from glmserve.server_secret import ServerSecret

PURPOSE = "responses.reasoning-seal"


class InvalidSeal(ValueError):
    """The token was not issued under this server's secrets (or was altered)."""


class ReasoningSeal:
    def __init__(self, secret: ServerSecret) -> None:
        self._fernet = secret.fernet(PURPOSE)

    def seal(self, reasoning: str) -> str:
        return self._fernet.encrypt(json.dumps({"v": 1, "reasoning": reasoning}, ensure_ascii=False).encode()).decode()

    def open(self, token: str) -> str:
        try:
            data = json.loads(self._fernet.decrypt(token.encode()))
        except (InvalidToken, ValueError, UnicodeError):
            raise InvalidSeal("encrypted_content was not issued under this server's secret (or was altered)") from None
        if not isinstance(data, dict) or not isinstance(data.get("reasoning"), str):
            raise InvalidSeal("encrypted_content holds no reasoning")
        return data["reasoning"]
