"""The server secret: where it comes from, and the per-purpose keys derived from it.

One secret signs Anthropic thinking blocks and seals Responses reasoning items; each use gets
its own key, derived with HKDF-SHA256 (``info = b"glmserve/<purpose>"``), so a key of one use
never works for another.  Replicas started with the same secret accept each other's
signatures and seals.

Sources, the first that is set wins:

* ``--secret-file PATH``: the file's bytes, as they are, are the secret (at least
  :data:`MIN_SECRET_BYTES`; e.g. ``head -c 32 /dev/urandom > PATH``); the file must be a
  regular file of mode 0600 or stricter (no access for group or others).
* ``GLMSERVE_SECRET``: the secret in hex (at least 64 hex digits); ``GLMSERVE_SECRET=$(xxd -p
  -c0 PATH)`` is the same secret as ``--secret-file PATH``.
* neither: 32 random bytes generated once in ``<glmserve cache>/secrets/server.key`` (directory
  0700, file 0600) and reused across restarts on this machine.

Rotation: ``--previous-secret-file PATH`` (repeatable) or ``GLMSERVE_PREVIOUS_SECRET`` (hex,
comma-separated) name secrets that are still accepted when verifying a signature or opening
a seal, never used to issue one.  Any problem with a named secret is a :class:`SecretError`
at start-up, before the engine loads.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets as _random
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

from cryptography.fernet import Fernet, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from glmserve.models import cache_dir

MIN_SECRET_BYTES = 32
ENV_SECRET = "GLMSERVE_SECRET"
ENV_PREVIOUS = "GLMSERVE_PREVIOUS_SECRET"


class SecretError(ValueError):
    """A named secret is missing, too short, malformed or readable by others."""


def _derive(secret: bytes, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"glmserve/{purpose}".encode()).derive(secret)


class ServerSecret:
    """The current secret (issues and verifies) and previous ones (verify only)."""

    def __init__(self, current: bytes, previous: Sequence[bytes] = ()) -> None:
        for s in (current, *previous):
            if len(s) < MIN_SECRET_BYTES:
                raise SecretError(f"a server secret must be at least {MIN_SECRET_BYTES} bytes, got {len(s)}")
        self._secrets = [current, *(p for p in previous if p != current)]
        self._keys: dict[str, list[bytes]] = {}

    def keys(self, purpose: str) -> list[bytes]:
        """The 32-byte keys for ``purpose``: the current secret's first, then the previous ones'."""
        keys = self._keys.get(purpose)
        if keys is None:
            keys = self._keys[purpose] = [_derive(s, purpose) for s in self._secrets]
        return keys

    def mac(self, purpose: str, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` under the current secret's key for ``purpose``."""
        return hmac.new(self.keys(purpose)[0], data, hashlib.sha256).digest()

    def verify(self, purpose: str, data: bytes, mac: bytes) -> bool:
        """Whether ``mac`` is ``data``'s HMAC under the current or a previous secret."""
        return any(hmac.compare_digest(hmac.new(k, data, hashlib.sha256).digest(), mac) for k in self.keys(purpose))

    def fernet(self, purpose: str) -> MultiFernet:
        """Authenticated encryption for ``purpose``: encrypts under the current secret, decrypts
        under any (each derived key splits into Fernet's signing and encryption halves)."""
        return MultiFernet([Fernet(base64.urlsafe_b64encode(k)) for k in self.keys(purpose)])

    @classmethod
    def generate(cls) -> "ServerSecret":
        return cls(_random.token_bytes(MIN_SECRET_BYTES))


# --------------------------------------------------------------------------- sources


def read_secret_file(path: str | Path, flag: str = "--secret-file") -> bytes:
    """The bytes of a secret file, refused unless it is a regular file of at least
    :data:`MIN_SECRET_BYTES` bytes that only its owner may read."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise SecretError(f"{flag} {p}: no such file (create one with: head -c 32 /dev/urandom > {p} && "
                          f"chmod 600 {p})") from None
    except OSError as exc:
        raise SecretError(f"{flag} {p}: cannot read it: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SecretError(f"{flag} {p}: not a regular file")
    if st.st_mode & 0o077:
        raise SecretError(f"{flag} {p}: mode {stat.S_IMODE(st.st_mode):04o} lets group or others access it; "
                          f"it must be 0600 or stricter (chmod 600 {p})")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise SecretError(f"{flag} {p}: cannot read it: {exc.strerror}") from None
    if len(data) < MIN_SECRET_BYTES:
        raise SecretError(f"{flag} {p}: {len(data)} bytes; a secret must be at least {MIN_SECRET_BYTES} random bytes")
    return data


def _hex_secret(value: str, name: str) -> bytes:
    try:
        data = bytes.fromhex(value.strip())
    except ValueError:
        raise SecretError(f"{name} must be hex (at least {2 * MIN_SECRET_BYTES} hex digits)") from None
    if len(data) < MIN_SECRET_BYTES:
        raise SecretError(f"{name} holds {len(data)} bytes; a secret must be at least {MIN_SECRET_BYTES} bytes "
                          f"({2 * MIN_SECRET_BYTES} hex digits)")
    return data


def from_sources(secret_file: str | None = None, previous_files: Sequence[str] = (),
                 environ: dict[str, str] | None = None) -> ServerSecret | None:
    """The secret named by the flags or the environment; None when none is named (then
    :func:`default_secret` is used when first needed)."""
    env = os.environ if environ is None else environ
    previous = [read_secret_file(f, "--previous-secret-file") for f in previous_files]
    previous += [_hex_secret(v, ENV_PREVIOUS) for v in env.get(ENV_PREVIOUS, "").split(",") if v.strip()]
    if secret_file:
        current = read_secret_file(secret_file)
    elif env.get(ENV_SECRET):
        current = _hex_secret(env[ENV_SECRET], ENV_SECRET)
    elif previous:
        raise SecretError("a previous secret needs a current one: --secret-file or GLMSERVE_SECRET")
    else:
        return None
    return ServerSecret(current, previous)


def default_secret_path() -> Path:
    return cache_dir() / "secrets" / "server.key"


_defaults: dict[Path, ServerSecret] = {}
_defaults_lock = threading.Lock()


def default_secret(path: Path | None = None) -> ServerSecret:
    """The secret generated once at ``path`` (default :func:`default_secret_path`).  The
    directory is made 0700 and the file 0600; the file appears whole or not at all (written
    aside, then hard-linked into place), so servers starting together agree on one secret."""
    path = path or default_secret_path()
    with _defaults_lock:
        if path in _defaults:
            return _defaults[path]
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(_random.token_bytes(MIN_SECRET_BYTES))
            try:
                os.link(tmp, path)
            except FileExistsError:  # another server won the race: use its secret
                pass
            finally:
                tmp.unlink()
        if path.parent.stat().st_uid == os.getuid():
            os.chmod(path.parent, 0o700)  # a directory an older glmserve made with the umask's mode
        secret = ServerSecret(read_secret_file(path, "the generated secret"))
        _defaults[path] = secret
        return secret


class SecretSource:
    """The app's secret: the one named at start-up, else the generated default, read when
    first needed (an app that never signs or seals writes no secret)."""

    def __init__(self, secret: ServerSecret | None = None) -> None:
        self._secret = secret
        self._lock = threading.Lock()

    def get(self) -> ServerSecret:
        with self._lock:
            if self._secret is None:
                self._secret = default_secret()
            return self._secret
