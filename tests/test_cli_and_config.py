"""echoctl commands and start-up configuration, run as a user would run them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from echo.config import ConfigError, load_settings
from echo.core.auth import verify_token
from tests.conftest import SECRET, EchoProcess, connect, make_project


def echoctl(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "echo", *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_init_demo_copies_the_demos_that_list_and_run(tmp_path: Path) -> None:
    result = echoctl("init", "myproj", "--demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    project = tmp_path / "myproj"
    assert ".echo/" in (project / ".gitignore").read_text()
    assert (project / "functions" / "demo-angry" / "handler.py").exists()
    assert (project / "apps" / "chat-demo" / "index.html").exists()
    assert json.loads((project / "associations.json").read_text())["applications"]["chat-demo"]
    listed = echoctl("functions", "list", cwd=project)
    assert listed.returncode == 0 and "demo-angry" in listed.stdout and "chat-demo/angry" in listed.stdout
    invoked = echoctl("functions", "invoke", "demo-angry", "--data", '{"text": "hey"}', cwd=project)
    assert invoked.returncode == 0, invoked.stderr
    assert json.loads(invoked.stdout) == {"text": "HEY!!!"}


def test_functions_new_then_invoke(tmp_path: Path) -> None:
    assert echoctl("init", ".", "--demo", cwd=tmp_path).returncode == 0
    created = echoctl("functions", "new", "shout-back", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert json.loads(echoctl("functions", "invoke", "shout-back", "-d", "[1, 2]",
                              cwd=tmp_path).stdout) == [1, 2]
    again = echoctl("functions", "new", "shout-back", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["functions", "invoke", "demo-angry", "--data", "{oops"], "--data is not JSON"),
        (["functions", "invoke", "nope"], "function 'nope' not_found"),
        (["functions", "new", "bad name"], "'bad name' is not a function name"),
        (["jwt", "bad app!"], "is not an app name"),
        (["dev", "--project", "/does/not/exist"], "no project folder /does/not/exist"),
    ],
)
def test_bad_arguments_get_one_line_errors_not_tracebacks(
    tmp_path: Path, args: list[str], message: str
) -> None:
    echoctl("init", ".", cwd=tmp_path)
    result = echoctl(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_function_errors_from_invoke_are_explained(tmp_path: Path) -> None:
    make_project(tmp_path)
    result = echoctl("functions", "invoke", "fail-raise", cwd=tmp_path)
    assert result.returncode == 1
    assert "raised: ValueError: boom from fail-raise" in result.stderr


def test_jwt_prints_tokens_that_the_dev_server_accepts(tmp_path: Path) -> None:
    echoctl("init", ".", "--demo", cwd=tmp_path)
    result = echoctl("jwt", "chat-demo", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["endpoint"] == "http://localhost:3000"
    secret = (tmp_path / ".echo" / "secret").read_text().strip()
    assert verify_token(secret, body["jwt"], app="chat-demo").admin is False
    assert verify_token(secret, body["adminJwt"], app="chat-demo").admin is True
    # the plain form, as Ekko printed it
    plain = echoctl("jwt", "chat-demo", cwd=tmp_path).stdout
    assert "Echo server endpoint" in plain and "User JWT" in plain and "Admin JWT" in plain


def test_settings_environment_wins_over_file_and_bad_values_are_named(tmp_path: Path) -> None:
    (tmp_path / "echo.toml").write_text('port = 4000\nmax_message_bytes = 1024\n')
    settings = load_settings(tmp_path, environ={"ECHO_PORT": "5000"})
    assert settings.port == 5000 and settings.max_message_bytes == 1024
    with pytest.raises(ConfigError, match="ECHO_PORT: expected a whole number, got 'abc'"):
        load_settings(tmp_path, environ={"ECHO_PORT": "abc"})
    with pytest.raises(ConfigError, match="ECHO_SECRET: too short"):
        load_settings(tmp_path, environ={"ECHO_SECRET": "short"})
    (tmp_path / "echo.toml").write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        load_settings(tmp_path, environ={})
    (tmp_path / "echo.toml").write_text("port = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(tmp_path, environ={})


def test_bad_setting_stops_dev_startup_with_its_name(tmp_path: Path) -> None:
    make_project(tmp_path)
    result = echoctl("dev", cwd=tmp_path, env={"ECHO_PORT": "99999", "ECHO_SECRET": SECRET})
    assert result.returncode == 2
    assert "ECHO_PORT: 99999 is out of range" in result.stderr
    assert "Traceback" not in result.stderr


def test_broken_associations_at_start_serves_and_says_not_ready(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    (project / "associations.json").write_text('{"applications": {"a": {"channels": 3}}}')
    server = EchoProcess(project).start()
    try:
        ready = httpx.get(server.url + "/ready")
        assert ready.status_code == 503
        [problem] = ready.json()["problems"]
        assert "applications.a.channels: expected a list, got int" in problem
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "secret: not set"),
        ({"ECHO_SECRET": SECRET, "ECHO_REDIS_URL": "localhost:6379"},
         "ECHO_REDIS_URL: 'localhost:6379' is not a redis:// or rediss:// URL"),
        ({"ECHO_SECRET": SECRET, "ECHO_RUNNER": "nosuch"}, "no runner named 'nosuch'"),
    ],
)
def test_serve_refuses_to_start_misconfigured(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    make_project(tmp_path)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_")}
    result = subprocess.run(
        [sys.executable, "-m", "echo", "serve", "--port", "0"], cwd=tmp_path,
        capture_output=True, text=True, timeout=30, env={**clean, **env},
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.unit
def test_the_server_and_the_sdk_import_without_the_deploy_extras() -> None:
    """boto3, the Docker SDK and localstack-client are extras: Echo imports them where they
    are used, and says which extra to install when one is missing."""
    import subprocess
    import sys

    probe = """
import sys
for name in ("boto3", "botocore", "docker", "localstack_client"):
    sys.modules[name] = None  # as if not installed
import echo.sdk, echo.core.app, echo.cli, echo.runners.lambda_runner  # noqa: F401
from echo.aws import aws_client
from echo.extras import MissingExtra
try:
    aws_client("lambda", region="us-east-1")
except MissingExtra as exc:
    print(exc)
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "pip install 'echo-realtime[aws]'" in run.stdout


def test_the_quick_path_from_an_empty_folder(tmp_path: Path) -> None:
    """The README's path: init a minimal project in an empty folder, start dev, use it."""
    started_empty = echoctl("dev", "--port", "1", cwd=tmp_path)  # the mistake first
    assert started_empty.returncode != 0 and "Traceback" not in started_empty.stderr
    assert "is not an Echo project" in started_empty.stderr
    assert "echoctl init ." in started_empty.stderr
    assert not (tmp_path / "functions").exists()  # and nothing was made behind its back

    made = echoctl("init", ".", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        ".gitignore", "apps/hello/index.html", "associations.json", "echo.toml",
        "functions/hello/handler.py"]
    assert "valid" in echoctl("associations", "check", cwd=tmp_path).stdout
    server = EchoProcess(tmp_path).start()
    try:
        page = httpx.get(server.url + "/apps/hello/")
        assert page.status_code == 200 and "/dev/token?app=hello" in page.text

        async def say_hello() -> Any:
            client = await connect(server, "hello")
            try:
                await client.call("subscribe", {"channels": ["greetings"]})
                ack = await client.call("publish", {"channel": "greetings",
                                                    "message": {"text": "hi"}})
                assert ack["ok"], ack
                return (await client.wait_for("message"))[0]["message"]
            finally:
                await client.disconnect()

        assert asyncio.run(say_hello()) == {"text": "hi 👋"}
    finally:
        server.stop()


def test_cli_commands_find_the_dev_server_where_it_listens(tmp_path: Path) -> None:
    make_project(tmp_path)
    server = EchoProcess(tmp_path).start()  # on a free port, not echo.toml's 3000
    try:
        recorded = json.loads((tmp_path / ".echo" / "dev-server.json").read_text())
        assert recorded["url"].endswith(f":{server.port}")
        body = json.loads(echoctl("jwt", "chat-demo", "--json", cwd=tmp_path).stdout)
        assert body["endpoint"] == recorded["url"]
        again = echoctl("dev", "--port", str(server.port), cwd=tmp_path)
        assert again.returncode != 0 and "Traceback" not in again.stderr
        assert f"port {server.port} on 127.0.0.1 is already in use" in again.stderr
        assert f"--port {server.port + 1}" in again.stderr
    finally:
        server.stop()
    assert not (tmp_path / ".echo" / "dev-server.json").exists()  # gone with the server
    body = json.loads(echoctl("jwt", "chat-demo", "--json", cwd=tmp_path).stdout)
    assert body["endpoint"] == "http://localhost:3000"


def test_user_tokens_expire_by_default_and_a_filtered_result_is_said(tmp_path: Path) -> None:
    import jwt as pyjwt

    make_project(tmp_path)

    def claims(*args: str) -> dict[str, Any]:
        body = json.loads(echoctl("jwt", "chat-demo", "--json", *args, cwd=tmp_path).stdout)
        return {kind: pyjwt.decode(body[kind], options={"verify_signature": False})
                for kind in ("jwt", "adminJwt")}

    default = claims()
    assert 86_000 < default["jwt"]["exp"] - default["jwt"]["iat"] <= 86_400
    assert "exp" not in default["adminJwt"]
    forever = claims("--ttl", "0")
    assert "exp" not in forever["jwt"] and "exp" not in forever["adminJwt"]
    assert echoctl("jwt", "chat-demo", "--ttl", "-5", cwd=tmp_path).returncode != 0
    dropped = echoctl("functions", "invoke", "demo-filter-shouting", "-d", '{"text": "LOUD"}',
                      cwd=tmp_path)
    assert dropped.returncode == 0 and dropped.stdout.strip() == "null"
    assert "filtered (None)" in dropped.stderr
