"""What a task of the AWS deployment runs: fetch associations.json from S3, then ``echoctl serve``.

``ECHO_ASSOCIATIONS_S3`` (``s3://BUCKET/KEY``) is the deployment's copy, uploaded by
``echoctl deploy`` and ``echoctl associations push``. It is written to ``ECHO_ASSOCIATIONS``
(the image's own copy when there is no object yet, e.g. while the very first deploy is still
creating the stack). With Redis, that file only seeds an empty Redis; the current document
lives in Redis and every node follows it.

When ``CLOUDWATCH_SERVICE_NAME`` is set (the template sets it), it first starts
:mod:`echo.targets.aws.metrics_emitter` as a separate process, which publishes the open
connections for autoscaling, and :mod:`echo.targets.aws.drain_watch` (with
``ECHO_TARGET_GROUP_ARN``), which starts the drain when the ALB drains the task; then it
execs the server, which so keeps this PID and gets ECS's SIGTERM directly (no forwarding
to get wrong).

Run as ``python -m echo.targets.aws.bootstrap``; any further arguments go to ``echoctl serve``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("echo.bootstrap")


def split_s3_url(url: str) -> tuple[str, str]:
    if not url.startswith("s3://") or "/" not in url[5:]:
        raise ValueError(f"ECHO_ASSOCIATIONS_S3={url!r} is not s3://BUCKET/KEY")
    bucket, _, key = url[5:].partition("/")
    return bucket, key


def fetch_associations(environ: dict[str, str], client: object | None = None) -> Path | None:
    """Download the deployment's associations.json; return where it was written (or None)."""
    url = environ.get("ECHO_ASSOCIATIONS_S3")
    if not url:
        return None
    bucket, key = split_s3_url(url)
    if client is None:
        import boto3

        client = boto3.client("s3", region_name=environ.get("ECHO_AWS_REGION"))
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]
    except Exception as exc:  # NoSuchKey before the first upload, or S3 unreachable
        log.warning("no associations from %s (%s); using the image's copy", url, exc)
        return None
    target = Path(environ.get("ECHO_ASSOCIATIONS", "associations.json"))
    try:
        target.write_bytes(body)
    except OSError:
        target = Path(tempfile.gettempdir()) / "echo-associations.json"
        target.write_bytes(body)
        environ["ECHO_ASSOCIATIONS"] = str(target)
    log.info("associations from %s written to %s (%d bytes)", url, target, len(body))
    return target


def start_metrics_emitter(environ: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """The connections publisher, beside the server (it cannot run in it after the exec)."""
    from echo.targets.aws.metrics_emitter import SERVICE_ENV

    if not environ.get(SERVICE_ENV):
        return None
    return subprocess.Popen([sys.executable, "-m", "echo.targets.aws.metrics_emitter"],
                            env=environ, stdin=subprocess.DEVNULL)


def start_drain_watch(environ: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """The watcher that starts Echo's drain when the ALB drains this task (SIGTERM comes
    only after the ALB has closed the sockets)."""
    from echo.targets.aws.drain_watch import TARGET_GROUP_ENV

    if not environ.get(TARGET_GROUP_ENV):
        return None
    return subprocess.Popen([sys.executable, "-m", "echo.targets.aws.drain_watch"],
                            env=environ, stdin=subprocess.DEVNULL)


def main() -> None:
    from echo.core import logs

    logs.configure("info", os.environ.get("ECHO_LOG_FORMAT", "plain"))
    environ = dict(os.environ)
    fetch_associations(environ)
    start_metrics_emitter(environ)
    start_drain_watch(environ)
    os.execvpe("echoctl", ["echoctl", "serve", *sys.argv[1:]], environ)


if __name__ == "__main__":
    main()
