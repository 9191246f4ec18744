"""A trusted function on an encrypted channel: its host opens the envelope, the function
sees the plaintext as on any channel, and its result is sealed again under the same key id.

The keys are the app's master keys (``ECHO_E2E_KEYS``: ``{"kid": "<base64url>"}``) in the
function's own environment, never in the server's messages; each channel's key is derived
from them (:func:`echo.sdk.e2e.channel_key`), as the app's backend derives the keys it hands
its clients. Whoever runs the function can read the channel: that host joins the trust
boundary (README: Encrypted channels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from echo.sdk import e2e

KEYS_ENV = "ECHO_E2E_KEYS"


@dataclass(frozen=True)
class Sealer:
    """Seals a function's result for the channel its input came from, under the same kid."""

    key: bytes
    kid: str
    app: str
    channel: str

    def seal(self, result: Any) -> Any:
        if result is None:  # filtered: nothing to seal
            return None
        return e2e.encrypt(result, self.key, app=self.app, channel=self.channel, kid=self.kid)


def master_keys(environ: dict[str, str] | None = None) -> dict[str, bytes]:
    text = (os.environ if environ is None else environ).get(KEYS_ENV)
    if not text:
        raise LookupError(f"this function runs on an encrypted channel but {KEYS_ENV} is not set "
                          'in its environment (e.g. {"k1": "<base64url master key>"})')
    return e2e.keys_from_text(text)


def open_event(event: Any, context: dict[str, Any],
               keys: dict[str, bytes] | None = None) -> tuple[Any, Sealer]:
    """The plaintext of ``event`` and how to seal the result; raises ``DecryptFailed`` or
    ``LookupError`` (no keys) with a message that names the fix."""
    keys = master_keys() if keys is None else keys
    app, channel = str(context["app"]), str(context["channel"])
    problem = e2e.envelope_problem(event)
    if problem is not None:
        raise e2e.DecryptFailed(channel, problem)
    kid = event["kid"]
    master = keys.get(kid)
    if master is None:
        raise e2e.DecryptFailed(channel, f"no master key for kid {kid!r} in {KEYS_ENV}")
    key = e2e.channel_key(master, app, channel)
    return e2e.decrypt(event, key, app=app, channel=channel), Sealer(key, kid, app, channel)
