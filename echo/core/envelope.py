"""The envelope of an end-to-end encrypted channel, as the server sees it: a shape to check,
never a payload to read (the keys and the cryptography are the clients', :mod:`echo.sdk.e2e`).

    {"v": 1, "alg": "A256GCM", "kid": "k1", "iv": "<12 bytes>", "ct": "<ciphertext + tag>"}

``iv`` and ``ct`` are base64url without padding.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from echo.core.protocol import ErrorCode, ProtocolError

VERSION = 1
ALG = "A256GCM"
IV_BYTES = 12
KID = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")
_B64URL = re.compile(r"^[A-Za-z0-9_-]*\Z")
ENVELOPE_KEYS = frozenset({"v", "alg", "kid", "iv", "ct"})
ENVELOPE_SHAPE = '{"v": 1, "alg": "A256GCM", "kid": "...", "iv": "...", "ct": "..."}'


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    if not _B64URL.match(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def envelope_problem(value: Any) -> str | None:
    """Why ``value`` is not an envelope (None when it is one): what the server checks on an
    encrypted channel, without any key."""
    if not isinstance(value, dict):
        return f"got {type(value).__name__}, not an envelope object"
    missing = ENVELOPE_KEYS - value.keys()
    if missing:
        return f"envelope lacks {', '.join(sorted(missing))}"
    extra = value.keys() - ENVELOPE_KEYS
    if extra:
        return f"envelope has unknown key {sorted(map(str, extra))[0][:40]!r}"
    if value["v"] != VERSION or isinstance(value["v"], bool):
        return f"envelope version must be {VERSION}"
    if value["alg"] != ALG:
        return f'envelope alg must be "{ALG}"'
    if not isinstance(value["kid"], str) or not KID.match(value["kid"]):
        return "envelope kid must be 1-64 characters of letters, digits and . _ -"
    iv, ct = value["iv"], value["ct"]
    if not isinstance(iv, str) or len(iv) != 16 or not _B64URL.match(iv):
        return "envelope iv must be 12 bytes, base64url (16 characters)"
    if not isinstance(ct, str) or len(ct) < 22 or not _B64URL.match(ct) or len(ct) % 4 == 1:
        return "envelope ct must be base64url ciphertext with its 16-byte tag"
    return None




def refuse_plaintext(channel: str, message: Any) -> None:
    """Raise ``bad_request`` unless ``message`` is an envelope: an encrypted channel relays
    nothing the server could read. The reason names the shape, never the message."""
    problem = envelope_problem(message)
    if problem is not None:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"channel {channel!r} is end-to-end encrypted: publish.message must be "
                            f"an envelope {ENVELOPE_SHAPE} ({problem})")
