"""``echoctl``: thin commands that parse, call and print. No logic lives here."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import echo
from echo.config import ConfigError, Settings, is_set, load_settings, with_dev_secret

app = typer.Typer(
    help="Echo: real-time messaging with in-transit middleware. Start with `echoctl dev`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
functions_app = typer.Typer(help="Create, list and run echo functions.", no_args_is_help=True)
app.add_typer(functions_app, name="functions")
associations_app = typer.Typer(help="Check and push associations.json.", no_args_is_help=True)
app.add_typer(associations_app, name="associations")

out = Console()
err = Console(stderr=True)

ProjectOption = Annotated[
    Path, typer.Option("--project", "-C", help="Project folder.", show_default="current folder")
]


USER_TOKEN_TTL = 24 * 3600
"""What a user token from `echoctl jwt` lives by default: a forgotten one stops working."""


def fail(message: str, hint: str | None = None, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    if hint:
        err.print(f"[dim]hint:[/] {hint}", highlight=False)
    raise typer.Exit(code)


def settings_for(project: Path | None, dev: bool = True, **overrides: Any) -> Settings:
    project = project or Path.cwd()
    if not project.is_dir():
        fail(f"no project folder {project}", "create one with `echoctl init DIR`")
    try:
        settings = load_settings(project, **overrides)
    except ConfigError as exc:
        fail(str(exc), "fix the setting in echo.toml or the ECHO_* environment variable")
    return with_dev_secret(settings) if dev else settings


def _logging(level: str, style: str = "auto") -> None:
    """rich for a person at a terminal; plain one-line records for files and collectors;
    every record bounded (echo/core/logs.py)."""
    from echo.core import logs

    logs.configure(level, style, terminal=err.is_terminal)


def template_dir() -> Path:
    """Demo functions/apps: packaged in a wheel, or the repository itself in a checkout."""
    packaged = Path(echo.__file__).parent / "_template"
    return packaged if packaged.is_dir() else Path(echo.__file__).parent.parent


@app.command()
def version() -> None:
    """Print Echo's version."""
    out.print(echo.__version__)


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Folder to create.")] = Path("."),
    demo: Annotated[bool, typer.Option("--demo", help="Copy the talk's demos instead: chat, "
                                       "live map, admin page and their functions.")] = False,
) -> None:
    """Make a project: one app, one function, one channel (or, with --demo, the demos)."""
    from echo import starter

    directory.mkdir(parents=True, exist_ok=True)
    created = []
    files = dict(starter.FILES)
    if demo:
        source = template_dir()
        for name in ("functions", "apps"):
            target = directory / name
            if target.exists():
                out.print(f"[yellow]kept[/] existing {target}")
                continue
            shutil.copytree(
                source / name, target, ignore=shutil.ignore_patterns("__pycache__", "node_modules")
            )
            created.append(f"{name}/")
        files = {"associations.json": (source / "associations.json").read_text(encoding="utf-8"),
                 "echo.toml": starter.SETTINGS, ".gitignore": starter.GITIGNORE}
    for name, content in files.items():
        target = directory / name
        if target.exists():
            out.print(f"[yellow]kept[/] existing {target}")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
        created.append(name)
    out.print(f"[green]created[/] {', '.join(created) or 'nothing new'} in {directory.resolve()}")
    page = "apps/chat-demo/" if demo else f"apps/{starter.APP}/"
    out.print(f"next: [bold]cd {directory} && echoctl dev[/], then open "
              f"http://localhost:3000/{page}")


@app.command()
def dev(
    project: ProjectOption = Path("."),
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning...")] = None,
    functions: Annotated[
        str, typer.Option(help="Where functions run: local (worker processes) or localstack.")
    ] = "local",
) -> None:
    """Run server, function runner and hot reload, and serve apps/ under /apps/."""
    from echo.emulator import address
    from echo.emulator.dev import FUNCTION_MODES, build_dev_server

    if functions not in FUNCTION_MODES:
        fail(f"--functions {functions!r} is not one of {', '.join(FUNCTION_MODES)}")
    settings = settings_for(project, dev=False, host=host, port=port, log_level=log_level)
    _refuse_a_folder_that_is_not_a_project(settings)  # before anything is written there
    settings = with_dev_secret(settings)
    if not is_set(settings.project_dir, "public_status"):  # a laptop's own status: public
        settings = dataclasses.replace(settings, public_status=True)
    _logging(settings.log_level, settings.log_format)
    from echo.core import serving
    from echo.transport.http_guard import Guard

    server = build_dev_server(settings, functions)
    def banner() -> None:
        base = settings.local_url
        apps_dir = settings.path(settings.apps_dir)
        apps = sorted(p.name for p in apps_dir.iterdir() if (p / "index.html").exists()) \
            if apps_dir.is_dir() else []
        err.print(f"\n[bold green]Echo dev server[/] at [bold]{base}[/]  (Ctrl+C to stop)")
        for name in apps:
            query = "?app=chat-demo" if name == "admin" else ""
            err.print(f"  app        {base}/apps/{name}/{query}")
        where = "LocalStack Lambda" if functions == "localstack" else "local workers"
        err.print(f"  functions  {settings.path(settings.functions_dir)} ({where}, hot reload on)")
        err.print(f"  channels   {settings.path(settings.associations)} (applied live)")
        err.print(f"  tokens     pages here: {base}/dev/token?app=NAME (&admin=1)")
        err.print("             elsewhere: `echoctl jwt NAME`\n")
        recorded.append(address.record(settings))

    recorded: list[Path] = []
    try:
        serving.run(server.asgi, settings.host, settings.port, settings.log_level, on_ready=banner,
                    before_shutdown=server.drain, ws_max_size=server.options.max_payload,
                    guard=Guard(settings.header_timeout, settings.max_connections_per_ip,
                                settings.body_timeout, settings.keep_alive_timeout))
    except OSError as exc:
        _cannot_listen(settings, exc)
    finally:
        for path in recorded:
            address.forget(path)


def _cannot_listen(settings: Settings, exc: OSError) -> NoReturn:
    if exc.errno == errno.EADDRINUSE:
        fail(f"port {settings.port} on {settings.host} is already in use (another echoctl dev?)",
             f"choose another with --port {settings.port + 1} (or ECHO_PORT); "
             f"`ss -ltnp 'sport = :{settings.port}'` shows who holds it")
    fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}",
         "check --host (an address of this machine) and --port (1024 or above without root)")


def _refuse_a_folder_that_is_not_a_project(settings: Settings) -> None:
    """``echoctl dev`` started in the wrong folder: say what is missing, not serve nothing."""
    associations = settings.path(settings.associations)
    functions_dir = settings.path(settings.functions_dir)
    from echo.core.functions import function_folders

    has_functions = bool(function_folders(functions_dir))
    if associations.exists() or has_functions or settings.path(settings.apps_dir).is_dir():
        if not associations.exists():
            err.print(f"[yellow]note:[/] no {associations}: no channel runs a function until "
                      "it exists (it is applied as soon as it is saved)", highlight=False)
        return
    fail(f"{settings.project_dir} is not an Echo project: it has no {settings.associations}, "
         f"no functions in {settings.functions_dir}/ and no {settings.apps_dir}/",
         "make one here with `echoctl init .`, or serve another folder with "
         "`echoctl dev --project DIR`")


@app.command()
def serve(
    project: ProjectOption = Path("."),
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning...")] = None,
) -> None:
    """Run the production server (what a container runs): no dev routes, no file watching.

    Configured by echo.toml and ECHO_* variables: ECHO_SECRET (required), ECHO_REDIS_URL
    (set it to run several nodes as one; several URLs, comma-separated, spread channels over
    them; ECHO_REDIS_CLUSTER=true for a Redis Cluster), ECHO_TRANSPORT (native or
    python-socketio), ECHO_RUNNER, ECHO_ASSOCIATIONS ...
    """
    settings = settings_for(project, dev=False, host=host, port=port, log_level=log_level)
    try:
        settings.require_secret()
    except ConfigError as exc:
        fail(str(exc), "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    _logging(settings.log_level, settings.log_format)
    from echo.core import serving
    from echo.core.app import build_server
    from echo.transport.http_guard import Guard

    try:
        server = build_server(settings)
    except LookupError as exc:
        fail(str(exc), "set ECHO_RUNNER to one of the runners listed")
    try:
        serving.run(
            server.asgi, settings.host, settings.port, settings.log_level,
            on_ready=lambda: logging.getLogger("echo").info(
                "serving on %s:%s (transport %s, broker %s, runner %s)", settings.host,
                settings.port, settings.transport, server.broker.describe(), settings.runner),
            before_shutdown=server.drain,
            ws_max_size=server.options.max_payload,
                    guard=Guard(settings.header_timeout, settings.max_connections_per_ip,
                                settings.body_timeout, settings.keep_alive_timeout),
        )
    except OSError as exc:
        _cannot_listen(settings, exc)


@app.command()
def jwt(
    app_name: Annotated[
        str | None, typer.Argument(metavar="APP", help="App (namespace) name.")
    ] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Print only an admin token.")] = False,
    manage: Annotated[
        bool, typer.Option("--manage", help="Print only a management token (/associations).")
    ] = False,
    capability: Annotated[
        list[str] | None,
        typer.Option("--cap", help="Limit the user token: PATTERN=op,op (subscribe, publish, "
                                   "presence); repeatable.", metavar="PATTERN=OPS"),
    ] = None,
    uuid: Annotated[
        str | None, typer.Option("--uuid", help="The user the user token is for (its connections "
                                                "must say this uuid; user:UUID opens to it).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    ttl: Annotated[int | None, typer.Option(
        help=f"Expire after this many seconds (0: never). Default: user tokens "
             f"{USER_TOKEN_TTL // 3600} h, admin tokens never, management tokens 5 min.")] = None,
    target: Annotated[
        str | None, typer.Option("--target", "-t", help="Use a deployment's endpoint and secret.")
    ] = None,
    project: ProjectOption = Path("."),
) -> None:
    """Print the endpoint, a user token and an admin token for APP (as Ekko's `jwt`)."""
    from echo.core.auth import AuthError, Capabilities, issue_management_token, issue_token
    from echo.core.protocol import CHANNEL_NAME

    if target:
        outputs = _run_target_step(open_target(target, project, None).outputs)
        if not outputs.secret:
            fail(f"the {target} deployment keeps its secret remotely", "see its README section")
        endpoint, secret = outputs.endpoint, outputs.secret
    else:
        from echo.emulator.address import dev_server_url

        settings = settings_for(project)
        endpoint = dev_server_url(settings)
        secret = settings.secrets_for(app_name)[0] if app_name else settings.require_secret()
    if ttl is not None and ttl < 0:
        fail(f"--ttl {ttl}: give seconds, or 0 for a token that never expires")
    if manage:
        print(issue_management_token(secret, ttl=300 if ttl is None else ttl or None))
        return
    if app_name is None:
        fail("APP is missing", "e.g. `echoctl jwt chat-demo`, or `echoctl jwt --manage`")
    if not CHANNEL_NAME.match(app_name):
        fail(f"{app_name!r} is not an app name", "use letters, digits and - _ : .")
    capabilities = None
    if capability:
        capabilities = {}
        for item in capability:
            pattern, sep, ops = item.partition("=")
            if not sep or not pattern:
                fail(f"--cap {item!r} is not PATTERN=op,op", "e.g. --cap 'chat:*=subscribe,publish'")
            capabilities[pattern] = [op.strip() for op in ops.split(",") if op.strip()]
        try:
            Capabilities.parse(capabilities)
        except AuthError as exc:
            fail(str(exc))
    if uuid is not None and not 1 <= len(uuid) <= 200:
        fail("--uuid must be 1-200 characters")
    user_token = issue_token(secret, app_name, admin=False,
                             ttl=USER_TOKEN_TTL if ttl is None else ttl or None,
                             capabilities=capabilities, uuid=uuid)
    admin_token = issue_token(secret, app_name, admin=True, ttl=ttl or None)
    if as_json:
        body = {"endpoint": endpoint, "appName": app_name, "adminJwt": admin_token}
        if not admin:
            body["jwt"] = user_token
        out.print_json(json.dumps(body))
        return
    if admin:
        print(admin_token)
        return
    out.print(f"[bold]Echo server endpoint:[/] {endpoint}")
    out.print(f"[bold]User JWT ({app_name}):[/]")
    print(user_token)
    out.print(f"[bold]Admin JWT ({app_name}):[/]")
    print(admin_token)


HANDLER_TEMPLATE = '''"""{name}: an echo function. `event` is the published message; return the new one.

Return None to drop the message. `context.client_context.custom` has app, channel, uuid.
"""


def handler(event, context):
    return event
'''


JS_TEMPLATE = '''// {name}: an echo function, as Ekko wrote them. `message` is the published message;
// return the new one, or null to drop it. `context.clientContext.custom` has app, channel, uuid.
exports.handler = async (message, context) => {{
  return message;
}};
'''


@functions_app.command("new")
def functions_new(
    name: Annotated[str, typer.Argument(help="Function name (letters, digits, - _).")],
    lang: Annotated[str, typer.Option("--lang", help="python, or js (Node.js, as Ekko's "
                                                     "functions)")] = "python",
    project: ProjectOption = Path("."),
) -> None:
    """Create functions/NAME with a handler that passes messages through."""
    from echo.core.associations import FUNCTION_NAME

    if not FUNCTION_NAME.match(name):
        fail(f"{name!r} is not a function name", "use letters, digits, - and _ (up to 64)")
    if lang not in ("python", "py", "js", "javascript"):
        fail(f"--lang {lang!r} is not python or js")
    settings = settings_for(project)
    folder = settings.path(settings.functions_dir) / name
    if folder.exists():
        fail(f"{folder} already exists", "pick another name, or edit the existing function")
    folder.mkdir(parents=True)
    source = "index.js" if lang in ("js", "javascript") else "handler.py"
    template = JS_TEMPLATE if source == "index.js" else HANDLER_TEMPLATE
    (folder / source).write_text(template.format(name=name), encoding="utf-8")
    (folder / "function.toml").write_text(
        f'description = "{name}"\ntimeout = {settings.function_timeout:g}\n', encoding="utf-8"
    )
    out.print(f"[green]created[/] {folder}/{source}")
    out.print(f"next: add it to a channel in {settings.associations} and publish on that channel")


@functions_app.command("list")
def functions_list(project: ProjectOption = Path(".")) -> None:
    """List the functions in functions/ and the channels that use them."""
    from echo.core.associations import AssociationsError
    from echo.core.functions import FunctionConfigError, discover
    from echo.core.store import FileStore

    settings = settings_for(project)
    try:
        specs = discover(settings.path(settings.functions_dir), settings.function_timeout)
    except FunctionConfigError as exc:
        fail(str(exc))
    try:
        associations = asyncio.run(FileStore(settings.path(settings.associations)).load())
    except AssociationsError as exc:
        fail(f"{settings.associations}: {exc}", "fix the file; `echoctl dev` keeps the last good one")
    used: dict[str, list[str]] = {}
    for app_name, chains in associations.apps.items():
        for channel, rule in chains.rules():
            for function in rule.functions:
                used.setdefault(function, []).append(f"{app_name}/{channel}")
    table = Table("function", "timeout", "channels", "description")
    for name, spec in specs.items():
        table.add_row(name, f"{spec.timeout:g}s", ", ".join(used.get(name, [])) or "-",
                      spec.description)
    for missing in sorted(set(used) - set(specs)):
        table.add_row(f"[red]{missing}[/]", "-", ", ".join(used[missing]), "[red]not found[/]")
    out.print(table)


@functions_app.command("invoke")
def functions_invoke(
    name: Annotated[str, typer.Argument(help="Function to run.")],
    data: Annotated[str, typer.Option("--data", "-d", help="The event, as JSON.")] = "null",
    app_name: Annotated[str, typer.Option("--app", help="context app")] = "local",
    channel: Annotated[str, typer.Option(help="context channel")] = "local",
    project: ProjectOption = Path("."),
) -> None:
    """Run one function locally, in a worker process, and print its result as JSON."""
    from echo.core.functions import FunctionCatalog, FunctionConfigError
    from echo.core.runners import FunctionError, InvocationContext
    from echo.emulator import dependencies
    from echo.emulator.local_runner import LocalRunner

    try:
        event = json.loads(data)
    except json.JSONDecodeError as exc:
        fail(f"--data is not JSON: {exc.msg} at column {exc.colno}",
             "quote it for the shell, e.g. --data '\"hello\"'")
    settings = settings_for(project)
    try:
        spec = FunctionCatalog(settings.path(settings.functions_dir), settings.function_timeout).get(
            name
        )
    except FunctionConfigError as exc:
        fail(str(exc))

    async def run() -> Any:
        if spec.path is not None and dependencies.target_of(settings.project_dir, spec.path):
            with err.status(f"installing {name}'s requirements.txt (once per version of it)…"):
                await dependencies.ensure(settings.project_dir, spec.path)
        runner = LocalRunner.from_settings(dataclasses.replace(settings, max_workers=1))
        await runner.start()
        try:
            context = InvocationContext(app=app_name, channel=channel, uuid="cli", message_id="cli-1")
            return await runner.invoke(spec, event, context)
        finally:
            await runner.close()

    try:
        result = asyncio.run(run())
    except FunctionError as exc:
        hint = "create it with `echoctl functions new NAME`" if exc.kind == "not_found" else None
        fail(str(exc), hint, code=1)
    except dependencies.InstallError as exc:
        fail(str(exc), "fix the requirement's name or version, then run this again", code=1)
    if result is None:
        err.print(f"[yellow]filtered (None)[/]: {name} dropped the message; it would not be "
                  "delivered", highlight=False)
    print(json.dumps(result, ensure_ascii=False))


@functions_app.command("package")
def functions_package(
    name: Annotated[str, typer.Argument(help="Function to package.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for NAME.zip.")] = Path("."),
    project: ProjectOption = Path("."),
) -> None:
    """Build the Lambda zip of a function (deterministic: same inputs, same bytes)."""
    from echo.core.functions import FunctionCatalog, FunctionConfigError
    from echo.packaging import PackagingError, build_zip

    settings = settings_for(project)
    try:
        package = build_zip(FunctionCatalog(settings.path(settings.functions_dir)).get(name))
    except (FunctionConfigError, PackagingError) as exc:
        fail(str(exc))
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}.zip"
    target.write_bytes(package.data)
    out.print(f"[green]wrote[/] {target} ({len(package.data)} bytes, sha256 {package.sha256})")


def _function_target(target: str, project: Path, option: list[str] | None, method: str) -> Any:
    plugin = open_target(target, project, option)
    if not hasattr(plugin, method):
        fail(f"target {target!r} does not manage functions on its own",
             f"use `echoctl deploy --target {target}`")
    return plugin


@functions_app.command("deploy")
def functions_deploy(
    target: TargetOption,
    names: Annotated[list[str] | None, typer.Argument(help="Functions (default: all).")] = None,
    option: TargetOptions = None,
    project: ProjectOption = Path("."),
) -> None:
    """Deploy functions to a target's function service; only changed ones are updated."""
    plugin = _function_target(target, project, option, "deploy_functions")
    changed = _run_target_step(lambda: plugin.deploy_functions(names, _progress))
    err.print(f"[green]updated[/] {', '.join(changed)}" if changed else "all functions up to date")


@functions_app.command("status")
def functions_status(
    target: TargetOption, option: TargetOptions = None, project: ProjectOption = Path(".")
) -> None:
    """Show deployed functions, their code SHA-256 and whether the local code differs."""
    plugin = _function_target(target, project, option, "function_status")
    out.print_json(json.dumps(_run_target_step(plugin.function_status)))


@functions_app.command("destroy")
def functions_destroy(
    target: TargetOption,
    names: Annotated[list[str], typer.Argument(help="Functions to delete.")],
    option: TargetOptions = None,
    project: ProjectOption = Path("."),
) -> None:
    """Delete functions from a target's function service (the local folders stay)."""
    plugin = _function_target(target, project, option, "destroy_functions")
    removed = _run_target_step(lambda: plugin.destroy_functions(names, _progress))
    err.print(f"[green]deleted[/] {', '.join(removed)}" if removed else "none of them was deployed")


TargetOption = Annotated[str, typer.Option("--target", "-t", help="Deploy target (docker, aws, ...).")]
TargetOptions = Annotated[
    list[str] | None,
    typer.Option("--option", "-o", help="Target setting KEY=VALUE (repeatable).", metavar="KEY=VALUE"),
]


def open_target(name: str, project: Path, options: list[str] | None) -> Any:
    from echo.targets.base import load_target

    parsed: dict[str, str] = {}
    for item in options or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--option {item!r} is not KEY=VALUE")
        parsed[key.strip()] = value.strip()
    settings = settings_for(project, dev=False)
    try:
        return load_target(name, settings, parsed)
    except LookupError as exc:
        fail(str(exc))
    except ValueError as exc:  # a target validating its options
        fail(str(exc))


def _progress(line: str) -> None:
    err.print("[dim]•[/] " + escape(line), highlight=False)


def _run_target_step(step: Any) -> Any:
    from echo.targets.base import TargetError

    try:
        return step()
    except TargetError as exc:
        fail(str(exc), code=1)


@app.command()
def deploy(
    target: TargetOption,
    option: TargetOptions = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only write what would be deployed.")] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for --dry-run output.")] = Path(
        "echo-out"
    ),
    project: ProjectOption = Path("."),
) -> None:
    """Deploy the project (server, functions, associations) to a target."""
    plugin = open_target(target, project, option)
    if dry_run:
        for path in _run_target_step(lambda: plugin.synth(out_dir, _progress)):
            err.print(f"[green]wrote[/] {path}")
        return
    outputs = _run_target_step(lambda: plugin.deploy(_progress))
    err.print(f"[bold green]deployed[/] to {target}: {outputs.endpoint}")
    err.print(f"tokens: [bold]echoctl jwt APP --target {target}[/]")


@app.command()
def status(
    target: TargetOption, option: TargetOptions = None, project: ProjectOption = Path(".")
) -> None:
    """Show what a target is running."""
    plugin = open_target(target, project, option)
    out.print_json(json.dumps(_run_target_step(plugin.status)))


@app.command()
def teardown(
    target: TargetOption,
    option: TargetOptions = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    project: ProjectOption = Path("."),
) -> None:
    """Remove everything a deploy created on a target."""
    plugin = open_target(target, project, option)
    if not yes and not typer.confirm(f"Remove the {target} deployment of {project.resolve()}?"):
        raise typer.Exit(1)
    _run_target_step(lambda: plugin.teardown(_progress))
    err.print(f"[green]removed[/] the {target} deployment")


@associations_app.command("check")
def associations_check(project: ProjectOption = Path(".")) -> None:
    """Validate associations.json and name the bad path if it is invalid."""
    from echo.core.functions import missing_functions

    settings = settings_for(project)
    associations = _load_associations_file(settings)
    if settings.runner == "local":
        missing = missing_functions(associations, settings.path(settings.functions_dir))
        if missing:
            fail(f"{settings.path(settings.associations)}: " + "; ".join(missing[:5]))
    out.print(f"[green]valid[/]: {len(associations.apps)} app(s): {', '.join(sorted(associations.apps))}")


def _load_associations_file(settings: Settings) -> Any:
    from echo.core.associations import AssociationsError
    from echo.core.store import FileStore

    path = settings.path(settings.associations)
    if not path.exists():
        fail(f"no {path}", "create it, or run `echoctl init`")
    try:
        return asyncio.run(FileStore(path).load())
    except AssociationsError as exc:
        fail(f"{path}: {exc}")


@associations_app.command("push")
def associations_push(
    target: Annotated[str | None, typer.Option("--target", "-t", help="Deploy target.")] = None,
    url: Annotated[str | None, typer.Option(help="Server URL (default: the dev server).")] = None,
    option: TargetOptions = None,
    project: ProjectOption = Path("."),
) -> None:
    """Upload associations.json to a deployment (--target) or PUT it to a running server."""
    from echo import management

    if target:
        plugin = open_target(target, project, option)
        associations = _load_associations_file(plugin.settings)
        _run_target_step(lambda: plugin.push_associations(associations, _progress))
        err.print(f"[green]pushed[/] associations to {target}")
        return
    settings = settings_for(project)
    associations = _load_associations_file(settings)
    from echo.emulator.address import dev_server_url

    endpoint = url or dev_server_url(settings)
    try:
        reply = management.put_associations(endpoint, associations.document,
                                            settings.require_secret(), timeout=10)
    except management.Unreachable as exc:
        fail(str(exc), "is `echoctl dev` running? pass --url otherwise")
    except management.ManagementError as exc:
        fail(f"{endpoint} refused the document ({exc.status}): {exc.body}")
    err.print(f"[green]pushed[/] associations to {endpoint}: version {reply.get('version')}")


def main() -> None:
    from echo.extras import MissingExtra

    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except MissingExtra as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
