"""Settings: one validated object built from ``echo.toml`` and ``ECHO_*`` environment variables.

The environment wins over the file, so a container can override a committed config. Every
value is checked once, at start-up; a bad one raises :class:`ConfigError` naming the setting
and where it came from, so the CLI can print one clear line instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from echo.core.webhooks import Webhook

from echo.transport import TRANSPORTS

CONFIG_FILE = "echo.toml"
ENV_PREFIX = "ECHO_"
DEV_SECRET_FILE = Path(".echo") / "secret"


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it and its source."""


@dataclass(frozen=True)
class Settings:
    """Everything a server, a runner and the CLI need to know about a project."""

    project_dir: Path = field(default_factory=Path.cwd)
    secret: str | None = None
    previous_secret: str | None = None
    app_secrets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    webhooks: dict[str, tuple[Webhook, ...]] = field(default_factory=dict)
    """Per app: where its events are POSTed (see echo/core/webhooks.py)."""
    host: str = "127.0.0.1"
    port: int = 3000
    redis_url: str | None = None
    runner: str = "local"
    lambda_endpoint_url: str | None = None
    lambda_prefix: str = ""
    aws_region: str = "us-east-1"
    associations_s3: str | None = None
    """``s3://BUCKET/KEY``: the associations' durable copy in S3 (the AWS target sets it)."""
    http_url: str | None = None
    functions_dir: Path = Path("functions")
    apps_dir: Path = Path("apps")
    associations: Path = Path("associations.json")
    max_message_bytes: int = 64 * 1024
    function_timeout: float = 3.0
    max_workers: int = 4
    max_pending_per_channel: int = 1000
    cors_origins: tuple[str, ...] = ("*",)
    log_level: str = "info"
    public_status: bool = False
    """``/ready``'s problems and ``/metrics`` for everyone; otherwise for management tokens
    only. ``echoctl dev`` turns it on unless set."""
    log_format: str = "auto"
    """``auto`` (rich on a terminal, else plain), ``plain``, ``json`` or ``rich``."""
    max_channels_per_connection: int = 100
    max_connections_per_app: int = 10_000
    max_namespaces_per_connection: int = 8
    """Apps one Engine.IO connection may join at once (native transport)."""
    publish_rate: float = 50.0
    publish_burst: int = 100
    backend_publish_rate: float = 2000.0
    """Per app and node for the HTTP server API, and per admin-token connection: an app's
    backend publishes for many users, so the browser-sized limit does not fit it."""
    backend_publish_burst: int = 4000
    max_queued_packets: int = 1000
    header_timeout: float = 10.0
    """Seconds a client has to send a request's headers (slowloris)."""
    keep_alive_timeout: float = 5.0
    """Seconds an idle HTTP connection is kept; behind a balancer, above its idle timeout."""
    body_timeout: float = 30.0
    """Seconds a client has, after its headers, to send a request's body."""
    max_connections_per_ip: int = 1000
    """Connections one IP address may hold open at once (HTTP and WebSocket); 0: no cap."""
    transport: str = "native"
    ping_interval: float = 25.0
    ping_timeout: float = 20.0
    connect_timeout: float = 45.0
    redis_cluster: bool = False
    history_size: int = 100
    """Messages a history channel keeps when its rule gives no ``size``."""
    history_ttl: float = 600.0
    """Seconds a history message is kept when its rule gives no ``ttl``."""
    history_meta_ttl: float = 86_400.0
    """Seconds a stream's position (offset, epoch) outlives its last message: a client away
    longer is told ``recovered: false`` (a new epoch), never given a silent gap."""
    idempotency_window: float = 120.0
    """Seconds an ``idempotencyKey`` makes a retried publish on its channel a no-op."""
    node_liveness: float = 30.0
    """Seconds (Redis) after which a node that stopped refreshing counts as dead: its
    presence entries and channel registrations go. Refreshed every third of it."""

    def path(self, relative: Path) -> Path:
        """Resolve a project-relative path setting."""
        return relative if relative.is_absolute() else self.project_dir / relative

    @property
    def local_url(self) -> str:
        """Where a browser on this machine reaches the server."""
        wildcard = self.host in ("127.0.0.1", "0.0.0.0", "::", "localhost")
        return f"http://{'localhost' if wildcard else self.host}:{self.port}"

    def secrets_for(self, app: str) -> tuple[str, ...]:
        """Secrets that verify tokens of ``app``; the first one signs new tokens."""
        if app in self.app_secrets:
            return self.app_secrets[app]
        return tuple(s for s in (self.require_secret(), self.previous_secret) if s)

    def management_secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.require_secret(), self.previous_secret) if s)

    def require_secret(self) -> str:
        if not self.secret:
            raise ConfigError(
                "secret: not set. Set ECHO_SECRET or `secret = \"...\"` in echo.toml "
                "(at least 32 characters)."
            )
        return self.secret


def to_int(name: str, raw: Any, low: int, high: int) -> int:
    """The one whole-number parser for settings and options, range-checked, errors named."""
    try:
        value = int(raw)
        if isinstance(raw, float) and raw != value:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}: {value} is out of range ({low}..{high})")
    return value


def _to_float(name: str, raw: Any, low: float, high: float) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    if not low < value <= high:
        raise ConfigError(f"{name}: {value} is out of range (more than {low}, at most {high})")
    return value


def redis_urls(value: str) -> list[str]:
    """The URLs of a ``redis_url`` setting: one, or several separated by commas."""
    return [url.strip() for url in value.split(",") if url.strip()]


def to_bool(name: str, raw: Any) -> bool:
    """The one boolean parser for settings and options: true/false, 1/0, yes/no, on/off."""
    if isinstance(raw, bool):
        return raw
    if str(raw).strip().lower() in ("1", "true", "yes", "on"):
        return True
    if str(raw).strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _to_str(name: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{name}: expected a non-empty string, got {raw!r}")
    return raw.strip()


def _to_origins(name: str, raw: Any) -> tuple[str, ...]:
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{name}: expected a list of origins or a comma-separated string")
    return tuple(i.strip() for i in items if i.strip())


def _to_app_secrets(name: str, raw: Any) -> dict[str, tuple[str, ...]]:
    """``{app: [newest, older...]}`` from a TOML table or a JSON string (ECHO_APP_SECRETS)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise ConfigError(f'{name}: expected JSON like {{"app": ["secret", ...]}}') from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a table of app = [secrets]")
    result = {}
    for app, secrets_ in raw.items():
        if isinstance(secrets_, str):
            secrets_ = [secrets_]
        if not isinstance(secrets_, list) or not secrets_:
            raise ConfigError(f"{name}.{app}: expected a non-empty list of secrets")
        for index, value in enumerate(secrets_):
            if not isinstance(value, str) or len(value) < 32:
                raise ConfigError(f"{name}.{app}[{index}]: each secret needs 32 or more characters")
        result[app] = tuple(secrets_)
    return result


_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _convert(key: str, name: str, raw: Any) -> Any:
    """Turn one raw value (from TOML or the environment) into its typed form."""
    match key:
        case "port":
            return to_int(name, raw, 0, 65535)
        case "max_message_bytes":
            return to_int(name, raw, 64, 16 * 1024 * 1024)
        case "max_workers":
            return to_int(name, raw, 1, 256)
        case "max_pending_per_channel":
            return to_int(name, raw, 1, 1_000_000)
        case "max_channels_per_connection" | "max_queued_packets":
            return to_int(name, raw, 1, 100_000)
        case "max_namespaces_per_connection":
            return to_int(name, raw, 1, 1000)
        case "max_connections_per_app":
            return to_int(name, raw, 1, 10_000_000)
        case "publish_burst" | "backend_publish_burst":
            return to_int(name, raw, 1, 1_000_000)
        case "publish_rate" | "backend_publish_rate":  # 0 turns the limit off
            if raw in (0, "0", 0.0):
                return 0.0
            return _to_float(name, raw, 0.0, 1_000_000.0)
        case "redis_cluster" | "public_status":
            return to_bool(name, raw)
        case "transport":
            value = _to_str(name, raw)
            if value not in TRANSPORTS:
                raise ConfigError(f"{name}: {raw!r} is not one of {', '.join(TRANSPORTS)}")
            return value
        case "app_secrets":
            return _to_app_secrets(name, raw)
        case "webhooks":
            from echo.core.webhooks import WebhookConfigError, parse_webhooks

            try:
                return parse_webhooks(name, raw)
            except WebhookConfigError as exc:
                raise ConfigError(str(exc)) from None
        case "ping_interval" | "ping_timeout":  # seconds; the handshake carries whole ms
            return _to_float(name, raw, 0.01, 3600.0)
        case "connect_timeout" | "header_timeout" | "body_timeout" | "keep_alive_timeout":
            return _to_float(name, raw, 0.01, 3600.0)
        case "max_connections_per_ip":
            return to_int(name, raw, 0, 10_000_000)
        case "history_size":
            return to_int(name, raw, 1, 10_000)
        case "history_ttl" | "history_meta_ttl":
            return _to_float(name, raw, 1.0, 30 * 24 * 3600.0)
        case "idempotency_window":
            return _to_float(name, raw, 1.0, 24 * 3600.0)
        case "node_liveness":
            return _to_float(name, raw, 1.0, 3600.0)
        case "function_timeout":
            return _to_float(name, raw, 0.0, 900.0)
        case "functions_dir" | "apps_dir" | "associations":
            return Path(_to_str(name, raw))
        case "cors_origins":
            return _to_origins(name, raw)
        case "log_format":
            style = _to_str(name, raw).lower()
            if style not in ("auto", "plain", "json", "rich"):
                raise ConfigError(f"{name}: {style[:40]!r} is not auto, plain, json or rich")
            return style
        case "log_level":
            level = _to_str(name, raw).lower()
            if level not in _LOG_LEVELS:
                raise ConfigError(f"{name}: {raw!r} is not one of {', '.join(_LOG_LEVELS)}")
            return level
        case "secret" | "previous_secret":
            value = _to_str(name, raw)
            if len(value) < 32:
                raise ConfigError(
                    f"{name}: too short ({len(value)} characters; HS256 needs 32 or more)"
                )
            return value
        case "runner":
            value = _to_str(name, raw)
            if not re.fullmatch(r"[a-z][a-z0-9_-]*", value):
                raise ConfigError(f"{name}: {raw!r} is not a runner name (e.g. local)")
            return value
        case "associations_s3":
            value = _to_str(name, raw)
            if not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,62}/\S+", value):
                raise ConfigError(f"{name}: {raw!r:.120} is not s3://BUCKET/KEY")
            return value
        case "lambda_endpoint_url" | "http_url":
            value = _to_str(name, raw)
            if not value.startswith(("http://", "https://")):
                raise ConfigError(f"{name}: {raw!r} is not an http:// or https:// URL")
            return value
        case "lambda_prefix":
            value = raw if isinstance(raw, str) else ""
            if not re.fullmatch(r"[A-Za-z0-9_-]{0,32}", value):
                raise ConfigError(f"{name}: {raw!r} must be up to 32 letters, digits, - or _")
            return value
        case "redis_url":  # one URL, or several (comma-separated): channels spread over them
            value = _to_str(name, raw)
            for url in redis_urls(value):
                if not url.startswith(("redis://", "rediss://", "unix://")):
                    raise ConfigError(f"{name}: {url!r} is not a redis:// or rediss:// URL")
            return value
        case _:
            return _to_str(name, raw)


_KEYS = tuple(f.name for f in dataclasses.fields(Settings) if f.name != "project_dir")


def load_settings(
    project_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build settings: defaults < echo.toml < ECHO_* environment < explicit overrides."""
    project_dir = (project_dir or Path.cwd()).resolve()
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}

    config_path = project_dir / CONFIG_FILE
    if config_path.exists():
        try:
            document = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: not valid TOML ({exc})") from None
        for key, raw in document.items():
            if key not in _KEYS:
                raise ConfigError(
                    f"{config_path}: unknown setting {key!r} (known: {', '.join(_KEYS)})"
                )
            values[key] = _convert(key, f"{CONFIG_FILE}: {key}", raw)

    for key in _KEYS:
        env_name = ENV_PREFIX + key.upper()
        if env_name in environ:
            values[key] = _convert(key, env_name, environ[env_name])

    for key, raw in overrides.items():
        if raw is not None:
            values[key] = _convert(key, f"--{key.replace('_', '-')}", raw)

    if "functions_dir" not in values and is_ekko_functions_folder(project_dir):
        values["functions_dir"] = Path(".")  # Ekko's layout: the functions beside the file
    return Settings(project_dir=project_dir, **values)


EKKO_MARKER = ".ekko_functions.txt"


def is_set(project_dir: Path, key: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``key`` is given in echo.toml or the environment (not left to its default)."""
    environ = os.environ if environ is None else environ
    if ENV_PREFIX + key.upper() in environ:
        return True
    config_path = project_dir / CONFIG_FILE
    try:
        return key in tomllib.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return False


def is_ekko_functions_folder(folder: Path) -> bool:
    """An Ekko project's ``ekko_functions/``: its function folders (``index.js``) sit beside
    its ``associations.json`` (and Ekko's CLI marks it with ``.ekko_functions.txt``)."""
    if (folder / "functions").is_dir():
        return False
    if (folder / EKKO_MARKER).exists():
        return True
    return (folder / "associations.json").exists() and any(
        (child / "index.js").exists() for child in folder.iterdir() if child.is_dir())


def with_dev_secret(settings: Settings) -> Settings:
    """Give a dev project a stable secret of its own, kept in ``.echo/secret``.

    ``echoctl dev`` and ``echoctl jwt`` both call this, so tokens printed by one are accepted
    by the other without any configuration. Never used by ``echoctl serve``.
    """
    if settings.secret:
        return settings
    secret_file = settings.project_dir / DEV_SECRET_FILE
    if secret_file.exists():
        secret = secret_file.read_text(encoding="utf-8").strip()
    else:
        secret = secrets.token_urlsafe(32)
        secret_file.parent.mkdir(parents=True, exist_ok=True)
        secret_file.write_text(secret + "\n", encoding="utf-8")
        secret_file.chmod(0o600)
    return dataclasses.replace(settings, secret=secret)
