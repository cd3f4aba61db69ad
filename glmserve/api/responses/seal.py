"""``encrypted_content`` for reasoning items: the model's reasoning, sealed by this server.

Clients that keep no server-side state (Codex CLI sends ``store: false`` with
``include: ["reasoning.encrypted_content"]``) carry the reasoning of earlier turns back as an
opaque token.  glmserve seals the reasoning text with authenticated encryption (Fernet:
AES-128-CBC + HMAC-SHA256) under a secret kept in the glmserve cache directory, so a token
survives a restart, cannot be read by the client, and cannot be forged: only a token this
server issued becomes the family's reasoning history.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from glmserve.models import cache_dir


class InvalidSeal(ValueError):
    """The token was not issued by this server (or was altered)."""


def default_secret_path() -> Path:
    return cache_dir() / "secrets" / "reasoning.key"


class ReasoningSeal:
    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    @classmethod
    def from_file(cls, path: Path | None = None) -> "ReasoningSeal":
        """The seal whose secret lives at ``path``, creating the secret (mode 0600) once.
        The file appears whole or not at all (written aside, then hard-linked into place), so
        servers starting together agree on one secret."""
        path = path or default_secret_path()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
            try:
                os.link(tmp, path)
            except FileExistsError:  # another server won the race: use its secret
                pass
            finally:
                tmp.unlink()
        return cls(path.read_bytes().strip())

    def seal(self, reasoning: str) -> str:
        return self._fernet.encrypt(json.dumps({"v": 1, "reasoning": reasoning}, ensure_ascii=False).encode()).decode()

    def open(self, token: str) -> str:
        try:
            data = json.loads(self._fernet.decrypt(token.encode()))
        except (InvalidToken, ValueError, UnicodeError):
            raise InvalidSeal("encrypted_content was not issued by this server (or was altered)") from None
        if not isinstance(data, dict) or not isinstance(data.get("reasoning"), str):
            raise InvalidSeal("encrypted_content holds no reasoning")
        return data["reasoning"]
