"""``echoctl deploy --target docker``: Redis, N Echo replicas and nginx on one engine.

Everything a deploy creates carries the label ``echo.project=<hash of the project folder>``
and lives on the network ``echo-<hash>``: ``status`` and ``teardown`` find it by that label.
Only the load balancer publishes a port, on 127.0.0.1. The secret is generated once, kept in
``.echo/targets/docker.json`` (mode 600) and handed to the replicas in their environment.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import secrets
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from echo import management
from echo.config import Settings, to_bool, to_int
from echo.core.associations import Associations
from echo.extras import require
from echo.targets.base import Outputs, Progress, Target, TargetError
from echo.targets.docker.images import build_image

LABEL = "echo.project"
ROLE = "echo.role"
CONFIG = "echo.config"
OPTIONS = ("base_image", "replicas", "port", "image", "redis_image", "lb_image", "remove_image")
READY_TIMEOUT = 90.0
LB_PORT = 8080
ECHO_PORT = 3000

STOP_GRACE = 20
"""Seconds a replaced replica has to drain (Echo's own drain is 10 s) before it is killed."""
NGINX_CONF = """\
worker_processes auto;
worker_rlimit_nofile 200000;
pid /tmp/echo-lb.pid;
error_log stderr warn;
events {{ worker_connections 65536; }}
http {{
  access_log off;
  client_body_temp_path /tmp/lb-body;
  proxy_temp_path /tmp/lb-proxy;
  fastcgi_temp_path /tmp/lb-fastcgi;
  uwsgi_temp_path /tmp/lb-uwsgi;
  scgi_temp_path /tmp/lb-scgi;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  upstream echo {{
{servers}
  }}
  server {{
    listen {port};
    location / {{
      proxy_pass http://echo;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }}
  }}
}}
"""


def nginx_conf(replicas: int) -> str:
    servers = "\n".join(f"    server echo-{i}:{ECHO_PORT};" for i in range(1, replicas + 1))
    return NGINX_CONF.format(servers=servers, port=LB_PORT)


def _int_option(options: dict[str, str], key: str, default: int, low: int, high: int) -> int:
    return to_int(f"-o {key}", options.get(key, str(default)), low, high)


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class DockerTarget(Target):
    """Options (``-o KEY=VALUE``): ``replicas`` (2), ``port`` (3000), ``base_image`` (the
    Dockerfile's BASE_IMAGE; also runs Redis and nginx, so it must hold redis-server and
    nginx), ``image`` (an existing Echo image: no build), ``redis_image`` (redis:7),
    ``lb_image`` (nginx:1.27), ``remove_image`` (teardown: also remove the image)."""

    name = "docker"

    def __init__(self, settings: Settings, options: dict[str, str]) -> None:
        super().__init__(settings, options)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown docker option(s) {', '.join(unknown)} "
                             f"(known: {', '.join(OPTIONS)})")
        self.replicas = _int_option(options, "replicas", 2, 1, 32)
        self.port = _int_option(options, "port", 3000, 1, 65535)
        self.base_image = options.get("base_image") or None
        self.redis_image = options.get("redis_image") or self.base_image or "redis:7"
        self.lb_image = options.get("lb_image") or self.base_image or "nginx:1.27"
        self.project = hashlib.sha256(str(settings.project_dir.resolve()).encode()).hexdigest()[:12]
        self.prefix = f"echo-{self.project}"
        self.labels = {LABEL: self.project}
        self._client: Any = None

    # -- the engine ----------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            docker = require("docker", "docker", "the Docker target")
            errors = require("docker.errors", "docker", "the Docker target")

            try:
                self._client = docker.from_env(timeout=300)
                self._client.ping()
            except errors.DockerException as exc:
                self._client = None
                raise TargetError(
                    f"Docker engine not reachable ({exc}): start it (`dockerd &` or Docker "
                    "Desktop), or point DOCKER_HOST at one"
                ) from exc
        return self._client

    def _containers(self, role: str | None = None) -> list[Any]:
        labels = [f"{LABEL}={self.project}"] + ([f"{ROLE}={role}"] if role else [])
        found = self.client.containers.list(all=True, filters={"label": labels})
        return sorted(found, key=lambda c: c.name)

    def _image(self, name: str, progress: Progress) -> Any:
        import docker.errors

        try:
            return self.client.images.get(name)
        except docker.errors.ImageNotFound:
            pass
        progress(f"pulling {name}")
        try:
            return self.client.images.pull(name)
        except docker.errors.APIError as exc:
            raise TargetError(
                f"cannot pull {name} ({exc.explanation or exc}): pass -o base_image=IMAGE "
                "(an image with python3, redis-server and nginx) or build/pull it first"
            ) from exc

    def _ensure(self, name: str, alias: str, fingerprint: str, progress: Progress,
                **spec: Any) -> Any:
        """The container ``name`` (``alias`` on the network) as specified; (re)created unless
        the one there was made from the same specification (``fingerprint``)."""
        import docker.errors

        try:
            existing = self.client.containers.get(name)
        except docker.errors.NotFound:
            existing = None
        if existing is not None:
            if existing.labels.get(LABEL) != self.project:
                raise TargetError(f"a container named {name} exists and is not this project's: "
                                  f"remove it (`docker rm -f {name}`)")
            if existing.labels.get(CONFIG) == fingerprint:
                if existing.status != "running":
                    progress(f"starting {name}")
                    existing.start()
                return existing
            progress(f"replacing {name}")
            # SIGTERM first: the replica drains and tells its clients, who reconnect to the
            # others; only then is it removed
            existing.stop(timeout=STOP_GRACE)
            existing.remove(force=True)
        progress(f"creating {name}")
        files = spec.pop("files", {})
        endpoint = self.client.api.create_endpoint_config(aliases=[alias])
        container = self.client.containers.create(
            name=name, labels={**self.labels, CONFIG: fingerprint, **spec.pop("labels", {})},
            restart_policy={"Name": "unless-stopped"}, detach=True, network=self.prefix,
            networking_config={self.prefix: endpoint}, **spec)
        if files:
            container.put_archive("/tmp", _tar(files))
        container.start()
        return container

    # -- deploy --------------------------------------------------------------------------

    def deploy(self, progress: Progress) -> Outputs:
        with _engine_errors():
            return self._deploy(progress)

    def _deploy(self, progress: Progress) -> Outputs:
        import docker.errors

        client = self.client
        state = self.load_state()
        secret = state.get("secret") or secrets.token_urlsafe(32)
        if state.get("secret") != secret:
            self.save_state({**state, "secret": secret})  # kept before any container gets it
        tag = f"{self.prefix}:latest"
        if self.options.get("image"):
            image_id = str(self._image(self.options["image"], progress).id)
            tag = self.options["image"]
        else:
            image_id = build_image(client, self.settings, tag, self.labels, self.base_image, progress)
        progress(f"image {tag} ({image_id[7:19]})")

        try:
            client.networks.get(self.prefix)
        except docker.errors.NotFound:
            progress(f"creating network {self.prefix}")
            client.networks.create(self.prefix, driver="bridge", labels=self.labels)
        redis_image = self._image(self.redis_image, progress)
        self._ensure(
            f"{self.prefix}-redis", "redis", _fingerprint(redis_image.id), progress,
            image=redis_image.id, labels={ROLE: "redis"},
            command=["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/tmp"],
        )

        environment = {
            "ECHO_SECRET": secret, "ECHO_REDIS_URL": "redis://redis:6379/0",
            "ECHO_HOST": "0.0.0.0", "ECHO_PORT": str(ECHO_PORT),
            "ECHO_MAX_CONNECTIONS_PER_IP": "0",  # all of it comes through the proxy
            "ECHO_FUNCTIONS_DIR": "/app/functions", "ECHO_ASSOCIATIONS": "/app/associations.json",
        }
        lb = self._running_lb()
        # one replica at a time, each ready before the next goes: the others keep serving
        replicas = []
        for index in range(1, self.replicas + 1):
            before = self._container_id(f"{self.prefix}-{index}")
            container = self._ensure(f"{self.prefix}-{index}", f"echo-{index}",
                                     _fingerprint(image_id, environment), progress,
                                     image=image_id, labels={ROLE: "echo"},
                                     environment=environment)
            self._wait_replicas([container], progress)
            if lb is not None and container.id != before:
                self._reload_lb(lb, progress)  # nginx resolves names at (re)load only
            replicas.append(container)
        for extra in self._containers("echo"):
            if extra.id not in {c.id for c in replicas}:
                progress(f"removing {extra.name}")
                extra.stop(timeout=STOP_GRACE)
                extra.remove(force=True)

        lb_image = self._image(self.lb_image, progress)
        conf = nginx_conf(self.replicas)
        self._ensure(
            f"{self.prefix}-lb", "lb", _fingerprint(lb_image.id, conf, self.port), progress,
            image=lb_image.id, labels={ROLE: "lb"},
            entrypoint=["nginx"], command=["-c", "/tmp/echo-lb.conf", "-g", "daemon off;"],
            ports={f"{LB_PORT}/tcp": ("127.0.0.1", self.port)}, files={"echo-lb.conf": conf},
        )
        endpoint = f"http://127.0.0.1:{self.port}"
        self._wait_http(endpoint + "/ready", progress)
        self._sync_associations(endpoint, secret, progress)
        client.images.prune(filters={"dangling": True, "label": f"{LABEL}={self.project}"})
        details = {"project": self.project, "image": tag, "image_id": image_id,
                   "replicas": self.replicas, "network": self.prefix}
        self.save_state({"endpoint": endpoint, "secret": secret, "details": details})
        return Outputs(endpoint, secret, details)

    def _container_id(self, name: str) -> str | None:
        import docker.errors

        try:
            return str(self.client.containers.get(name).id)
        except docker.errors.NotFound:
            return None

    def _running_lb(self) -> Any:
        import docker.errors

        try:
            lb = self.client.containers.get(f"{self.prefix}-lb")
        except docker.errors.NotFound:
            return None
        return lb if lb.status == "running" and lb.labels.get(LABEL) == self.project else None

    def _reload_lb(self, lb: Any, progress: Progress) -> None:
        """A graceful nginx reload: new workers resolve the replicas' names afresh, the old
        ones finish their connections."""
        progress("reloading the load balancer")
        result = lb.exec_run(["nginx", "-c", "/tmp/echo-lb.conf", "-s", "reload"])
        if result.exit_code != 0:
            raise TargetError(f"nginx did not reload: {result.output.decode(errors='replace')[-300:]}")

    def _wait_replicas(self, replicas: list[Any], progress: Progress) -> None:
        probe = ["python", "-c", "import urllib.request as u; "
                 f"u.urlopen('http://127.0.0.1:{ECHO_PORT}/ready', timeout=2)"]
        progress(f"waiting for {len(replicas)} replica(s) to be ready")
        deadline = time.monotonic() + READY_TIMEOUT
        for container in replicas:
            while True:
                container.reload()
                if container.status in ("exited", "dead"):
                    raise TargetError(f"{container.name} stopped:\n{_logs(container)}\n"
                                      f"see `docker logs {container.name}`")
                if container.status == "running" and container.exec_run(probe).exit_code == 0:
                    break
                if time.monotonic() > deadline:
                    raise TargetError(f"{container.name} not ready within {READY_TIMEOUT:.0f}s:\n"
                                      f"{_logs(container)}\nsee `docker logs {container.name}`")
                time.sleep(0.5)

    def _wait_http(self, url: str, progress: Progress) -> None:
        progress(f"waiting for {url}")
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise TargetError(f"the load balancer did not answer {url} within "
                                  f"{READY_TIMEOUT:.0f}s: see `docker logs {self.prefix}-lb`")
            time.sleep(0.3)

    def _sync_associations(self, endpoint: str, secret: str, progress: Progress) -> None:
        """The project's associations.json wins over what Redis still holds from before."""
        path = self.settings.path(self.settings.associations)
        if not path.exists():
            return
        wanted = json.loads(path.read_text(encoding="utf-8"))
        current = _request("GET", endpoint + "/associations", secret)
        if current != wanted:
            reply = _request("PUT", endpoint + "/associations", secret, wanted)
            progress(f"associations updated to version {reply.get('version')}")

    # -- status, teardown, associations ---------------------------------------------------

    def status(self) -> dict[str, Any]:
        with _engine_errors():
            containers = self._containers()
        if not containers:
            return {}
        rows = []
        for container in containers:
            health = container.attrs.get("State", {}).get("Health", {}).get("Status")
            rows.append({"name": container.name, "role": container.labels.get(ROLE),
                         "state": container.status, "health": health or "-",
                         "image": container.attrs.get("Config", {}).get("Image", "")[:19]})
        state = self.load_state()
        return {"endpoint": state.get("endpoint"), "project": self.project,
                "network": self.prefix, "containers": rows}

    def teardown(self, progress: Progress) -> None:
        with _engine_errors():
            self._teardown(progress)

    def _teardown(self, progress: Progress) -> None:
        import docker.errors

        for container in self._containers():
            progress(f"removing {container.name}")
            container.remove(force=True)
        for network in self.client.networks.list(filters={"label": f"{LABEL}={self.project}"}):
            progress(f"removing network {network.name}")
            network.remove()
        if to_bool("-o remove_image", self.options.get("remove_image", "no")):
            try:
                self.client.images.remove(f"{self.prefix}:latest")
                progress(f"removed image {self.prefix}:latest")
            except docker.errors.ImageNotFound:
                pass
        self.forget_state()

    def push_associations(self, associations: Associations, progress: Progress) -> None:
        outputs = self.outputs()
        if not outputs.secret:
            raise TargetError("no secret recorded for the docker deployment: deploy again")
        reply = _request("PUT", outputs.endpoint + "/associations", outputs.secret,
                         associations.document)
        progress(f"{outputs.endpoint}: associations version {reply.get('version')} "
                 "(Redis spreads it to every replica)")


@contextlib.contextmanager
def _engine_errors() -> Iterator[None]:
    """What the engine refuses (a port in use, a name taken...) as a TargetError."""
    import docker.errors

    try:
        yield
    except docker.errors.APIError as exc:
        raise TargetError(f"Docker refused: {exc.explanation or exc}; fix that, then run the "
                          "command again (`echoctl status --target docker` shows what runs)") from exc


def _tar(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _logs(container: Any, lines: int = 20) -> str:
    return str(container.logs(tail=lines).decode(errors="replace"))


def _request(method: str, url: str, secret: str, body: Any = None) -> Any:
    try:
        return management.call(method, url, secret, body)
    except management.ManagementError as exc:
        raise TargetError(str(exc)) from exc
    except management.Unreachable as exc:
        raise TargetError(f"{exc}: is the deployment running? "
                          "see `echoctl status --target docker`") from exc
