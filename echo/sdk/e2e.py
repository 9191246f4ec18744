"""End-to-end encryption of channel messages: the envelope, its keys, and a cipher per channel.

An encrypted channel's messages travel as an envelope the server can check but not read::

    {"v": 1, "alg": "A256GCM", "kid": "k1", "iv": "<12 bytes>", "ct": "<ciphertext + tag>"}

``iv`` and ``ct`` are base64url without padding. The plaintext is the message's JSON (UTF-8).
AES-256-GCM because every browser has it in WebCrypto and Python in ``cryptography``: no
library to ship to the page (Pusher's NaCl secretbox would need one). The associated data
binds the envelope to where it was published, so a ciphertext copied to another channel,
app or key id fails to decrypt::

    b"echo-e2e/1\\n" + app + b"\\n" + channel + b"\\n" + kid

Keys are 32 bytes. Echo never holds them: an app hands them to its clients (its own auth
endpoint), and can derive one per channel from a master key it keeps (:func:`channel_key`,
HKDF-SHA256), or users can share a passphrase (:func:`key_from_passphrase`, PBKDF2-SHA256).
The same rules are written in ``echo/client/echo.js`` for browsers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from echo.core.envelope import (
    ALG,
    ENVELOPE_KEYS,
    ENVELOPE_SHAPE,
    IV_BYTES,
    KID,
    VERSION,
    b64url,
    envelope_problem,
    unb64url,
)

__all__ = ["ALG", "ENVELOPE_KEYS", "ENVELOPE_SHAPE", "VERSION", "ChannelCipher", "DecryptFailed",
           "associated_data", "b64url", "channel_key", "decrypt", "encrypt", "envelope_problem",
           "key_from_passphrase", "keys_from_text", "unb64url"]

KEY_BYTES = 32
PBKDF2_ITERATIONS = 600_000


class DecryptFailed(ValueError):
    """An envelope that could not be opened: wrong or missing key, tampered, moved, or not an
    envelope at all. ``code`` is ``decrypt_failed`` (the browser client's error code too)."""

    code = "decrypt_failed"

    def __init__(self, channel: str, reason: str) -> None:
        super().__init__(f"{channel}: {reason}")
        self.channel = channel
        self.reason = reason


def associated_data(app: str, channel: str, kid: str) -> bytes:
    return f"echo-e2e/{VERSION}\n{app}\n{channel}\n{kid}".encode()


def _aesgcm(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(key) != KEY_BYTES:
        raise ValueError(f"an encryption key is {KEY_BYTES} bytes (got {len(key)})")
    return AESGCM(key)


def encrypt(message: Any, key: bytes, *, app: str, channel: str, kid: str) -> dict[str, Any]:
    """The envelope of ``message`` (any JSON value) for ``channel`` of ``app``."""
    if not KID.match(kid):
        raise ValueError(f"kid {kid!r}: 1-64 characters of letters, digits and . _ -")
    iv = os.urandom(IV_BYTES)
    # no NaN or Infinity: browsers' JSON.parse refuses them, so the two would disagree
    plaintext = json.dumps(message, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False).encode()
    ct = _aesgcm(key).encrypt(iv, plaintext, associated_data(app, channel, kid))
    return {"v": VERSION, "alg": ALG, "kid": kid, "iv": b64url(iv), "ct": b64url(ct)}


def decrypt(envelope: Any, key: bytes | Callable[[str], bytes | None], *, app: str,
            channel: str) -> Any:
    """The message inside ``envelope``; ``key`` is the key or a ``kid -> key`` lookup.
    Raises :class:`DecryptFailed` (never anything else) when it cannot be opened."""
    from cryptography.exceptions import InvalidTag

    problem = envelope_problem(envelope)
    if problem is not None:
        raise DecryptFailed(channel, problem)
    kid = envelope["kid"]
    try:
        found = key(kid) if callable(key) else key
    except Exception as exc:  # the app's own lookup failed: still a decrypt failure
        raise DecryptFailed(channel, f"the key lookup for kid {kid!r} raised "
                            f"{type(exc).__name__}") from None
    if found is None:
        raise DecryptFailed(channel, f"no key for kid {kid!r}")
    try:
        plaintext = _aesgcm(found).decrypt(unb64url(envelope["iv"]), unb64url(envelope["ct"]),
                                           associated_data(app, channel, kid))
    except InvalidTag:
        raise DecryptFailed(channel, "the ciphertext does not open with this key on this "
                            "channel (wrong key, tampered, or copied from elsewhere)") from None
    except ValueError as exc:  # a key of the wrong length, bad base64
        raise DecryptFailed(channel, str(exc)[:120]) from None
    try:
        return json.loads(plaintext, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # never quote it: the message would be in the reason
        raise DecryptFailed(channel, "the plaintext is not JSON (or nested too deeply)") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def channel_key(master_key: bytes, app: str, channel: str) -> bytes:
    """The key of one channel, derived from an app master key (HKDF-SHA256): a backend can
    hand out per-channel keys without storing any."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if len(master_key) < KEY_BYTES:
        raise ValueError(f"a master key is at least {KEY_BYTES} random bytes")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=f"echo-e2e/{VERSION}".encode(),
                info=f"{app}\n{channel}".encode()).derive(master_key)


def key_from_passphrase(passphrase: str, app: str, channel: str) -> bytes:
    """A channel key from a passphrase its users share (PBKDF2-SHA256, salted by the app and
    channel): as strong as the passphrase, no stronger."""
    import hashlib
    import unicodedata

    salt = f"echo-e2e/{VERSION}\n{app}\n{channel}".encode()
    typed = unicodedata.normalize("NFC", passphrase)  # "é" typed either way is one key
    return hashlib.pbkdf2_hmac("sha256", typed.encode(), salt, PBKDF2_ITERATIONS, KEY_BYTES)


def keys_from_text(text: str) -> dict[str, bytes]:
    """``{"kid": "<base64url 32+ bytes>", ...}`` (``ECHO_E2E_KEYS``): master keys by kid."""
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError('master keys are JSON: {"k1": "<base64url key>"}') from None
    if not isinstance(data, dict) or not data:
        raise ValueError('master keys are JSON: {"k1": "<base64url key>"}')
    keys: dict[str, bytes] = {}
    for kid, value in data.items():
        if not KID.match(kid) or not isinstance(value, str):
            raise ValueError(f"master key {kid[:40]!r}: kid and base64url key expected")
        key = unb64url(value)
        if len(key) < KEY_BYTES:
            raise ValueError(f"master key {kid!r} is {len(key)} bytes; at least {KEY_BYTES}")
        keys[kid] = key
    return keys


KeyLookup = Callable[[str, str], bytes | None]
"""``(channel, kid) -> key`` (None: no such key)."""


@dataclass
class ChannelCipher:
    """How a client encrypts one channel (or a glob of them): publishes use ``kid``; received
    envelopes name their own kid and are opened with ``key`` (for ``kid``) or ``get_key``."""

    kid: str = "k1"
    key: bytes | None = None
    get_key: KeyLookup | None = None
    _cache: dict[tuple[str, str], bytes] = field(default_factory=dict, repr=False)

    def key_for(self, channel: str, kid: str) -> bytes | None:
        if self.key is not None and kid == self.kid:
            return self.key
        if self.get_key is None:
            return None
        cached = self._cache.get((channel, kid))
        if cached is None:
            cached = self.get_key(channel, kid)
            if cached is not None:
                self._cache[(channel, kid)] = cached
        return cached
