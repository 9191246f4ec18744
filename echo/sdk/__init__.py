"""Echo's Python SDK, for an app's backend (and Python clients).

- :class:`ServerApi` / :class:`AsyncServerApi`: the HTTP server API (publish, broadcast,
  presence, channels, history, disconnect, unsubscribe), on httpx;
- :class:`RealtimeClient`: an async Socket.IO client (subscribe, publish with acks,
  history), which reconnects, re-subscribes and recovers missed messages by itself;
- :func:`user_token` / :func:`admin_token`: mint short-lived tokens for your users;
- :func:`verify_webhook`: check a webhook request's signature and age;
- :mod:`echo.sdk.e2e` / :class:`ChannelCipher`: end-to-end encrypted channels (envelopes,
  per-channel keys from a master key, passphrase keys).

Every refusal raises :class:`EchoError` with the server's ``code``.
"""

from echo.sdk.e2e import ChannelCipher, channel_key
from echo.sdk.errors import EchoError
from echo.sdk.realtime import RealtimeClient
from echo.sdk.server_api import AsyncServerApi, ServerApi
from echo.sdk.tokens import admin_token, user_token
from echo.sdk.webhooks import verify_webhook

__all__ = ["AsyncServerApi", "ChannelCipher", "EchoError", "RealtimeClient", "ServerApi",
           "admin_token", "channel_key", "user_token", "verify_webhook"]
