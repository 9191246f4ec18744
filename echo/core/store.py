"""Where the associations document lives: one interface, one class per backend.

The server holds the current :class:`Associations` in memory (the hot path reads it on every
publish) and asks a store to load it at start and to keep it when an admin PUTs a new one.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from echo.broker.connection import POOL_SIZE, redis_client, subscription
from echo.config import redis_urls
from echo.core.associations import Associations, parse_associations_text
from echo.extras import require

log = logging.getLogger("echo.store")

Changed = Callable[[], Awaitable[object]]


class AssociationsStore(abc.ABC):
    @abc.abstractmethod
    async def load(self) -> Associations:
        """The stored document, validated; raise AssociationsError if it is broken."""

    @abc.abstractmethod
    async def save(self, associations: Associations) -> Associations:
        """Keep ``associations``; return it as stored (with its version, where kept)."""

    async def watch(self, changed: Changed) -> None:  # noqa: B027 - optional hook
        """Call ``changed`` whenever another node may have stored a newer document.

        Runs until cancelled. Stores that are not shared have nothing to watch.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    async def offer(self, associations: Associations) -> bool:
        """This node holds ``associations``, newer than what the store gave it: put it back
        if the store still has older (a shared store that lost its data). True if it did."""
        return False

    def fallback(self) -> AssociationsStore | None:
        """Where a last known good copy is kept when this store is unreachable, if anywhere."""
        return None

    def describe(self) -> str:
        return type(self).__name__


class FileStore(AssociationsStore):
    """A JSON file on disk (``associations.json`` in a dev project); a missing file is empty."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def describe(self) -> str:
        return str(self.path)

    async def load(self) -> Associations:
        return await asyncio.to_thread(self._load)

    def _load(self) -> Associations:
        if not self.path.exists():
            return Associations.empty()
        return parse_associations_text(self.path.read_bytes(), source=self.path.name)

    async def save(self, associations: Associations) -> Associations:
        await asyncio.to_thread(self._save, associations)
        return associations

    def _save(self, associations: Associations) -> None:
        try:
            if json.loads(self.path.read_bytes()) == associations.document:
                return  # already there: keep the author's formatting
        except (OSError, ValueError):
            pass
        text = json.dumps(associations.document, indent=2) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # write-then-rename: a reader (or the file watcher) never sees half a document
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".associations.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class S3Store(AssociationsStore):
    """An object in S3 (``s3://BUCKET/KEY``): the AWS deployment's durable copy, so a PUT
    outlives Redis and every task (a task's own file would not). A missing object is empty."""

    def __init__(self, url: str, region: str, endpoint_url: str | None = None) -> None:
        if not url.startswith("s3://") or "/" not in url[5:]:
            raise ValueError(f"associations_s3 {url[:200]!r} is not s3://BUCKET/KEY")
        self.bucket, _, self.key = url[5:].partition("/")
        self.url = url
        boto3 = require("boto3", "aws", "keeping associations in S3")
        self.client = boto3.client("s3", region_name=region, endpoint_url=endpoint_url)

    def describe(self) -> str:
        return self.url

    async def load(self) -> Associations:
        return await asyncio.to_thread(self._load)

    def _load(self) -> Associations:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return Associations.empty()
        return parse_associations_text(body, source=self.url)

    async def save(self, associations: Associations) -> Associations:
        body = (json.dumps(associations.document, indent=2) + "\n").encode()
        await asyncio.to_thread(self.client.put_object, Bucket=self.bucket, Key=self.key,
                                Body=body, ContentType="application/json")
        return associations


# Versions are Redis-clock microseconds, bumped past the last one: they keep increasing even
# after Redis restarts empty (a plain INCR would start again at 1, and every node would then
# refuse the "older" documents). Scripts run alone in Redis, so two concurrent PUTs on two
# nodes can never leave an older document in place.
_NEXT_VERSION = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local version = math.max(now, (tonumber(redis.call('GET', KEYS[1])) or 0) + 1)
redis.call('SET', KEYS[1], string.format('%d', version))
"""
# Store document + version and tell every node.
_SAVE = _NEXT_VERSION + """
redis.call('HSET', KEYS[2], 'document', ARGV[1], 'version', string.format('%d', version))
redis.call('PUBLISH', ARGV[2], string.format('%d', version))
return string.format('%d', version)
"""
# The first node up with an empty Redis seeds it from its durable copy, as the oldest
# version there is (1): a node still running with a newer document (Redis restarted empty
# under it) then sees an older one, and offers its own back (_OFFER); later nodes find it.
_SEED = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[2], 'document', ARGV[1], 'version', '1')
  if (tonumber(redis.call('GET', KEYS[1])) or 0) < 1 then redis.call('SET', KEYS[1], '1') end
end
return redis.call('HMGET', KEYS[2], 'document', 'version')
"""
# A node's newer document replaces an older one (never a newer one), and every node re-reads.
_OFFER = """
local stored = tonumber(redis.call('HGET', KEYS[2], 'version')) or 0
local offered = tonumber(ARGV[2])
if stored >= offered then return 0 end
redis.call('HSET', KEYS[2], 'document', ARGV[1], 'version', ARGV[2])
if (tonumber(redis.call('GET', KEYS[1])) or 0) < offered then redis.call('SET', KEYS[1], ARGV[2]) end
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
"""


class RedisStore(AssociationsStore):
    """Shares the document between nodes through Redis; ``durable`` keeps it across restarts.

    Redis holds the current document and its version (``echo:associations``); a save
    publishes the new version on ``echo:associations:changed`` and every node re-reads.
    A node starting later reads the current version from Redis; if Redis is empty, the
    durable store (a file in dev, S3 in the cloud) seeds it.

    ``url`` may list several servers (the broker spreads channels over them): the document
    lives on the first. On a Redis Cluster (``cluster``) the URL is a seed node, commands go
    to the slot owner, and both keys share a hash tag so the scripts (which touch both) run
    on one node; a PUBLISH from a script reaches subscribers on every cluster node.
    """

    def __init__(self, url: str, durable: AssociationsStore, prefix: str = "echo", *,
                 cluster: bool = False) -> None:
        self.url = redis_urls(url)[0]
        self.durable = durable
        self.redis: Redis | RedisCluster = (RedisCluster.from_url(self.url, max_connections=POOL_SIZE,
                                                 socket_connect_timeout=2)
                           if cluster else redis_client(self.url))
        tag = f"{{{prefix}:associations}}" if cluster else f"{prefix}:associations"
        self.keys = (f"{tag}:version", tag)
        self.channel = f"{prefix}:associations:changed"
        self._durable_version = -1
        """The shared version last written to the durable copy."""

    def describe(self) -> str:
        return f"Redis (durable copy: {self.durable.describe()})"

    def fallback(self) -> AssociationsStore:
        return self.durable

    async def load(self) -> Associations:
        row: list[Any] = await self.redis.hmget(self.keys[1], "document", "version")
        document, version = row
        if document is None:
            seed = await self.durable.load()
            document, version = await self.redis.eval(
                _SEED, 2, *self.keys, json.dumps(seed.document)
            )
        associations = dataclasses.replace(
            parse_associations_text(document, source="associations in Redis"), version=int(version))
        if associations.version > self._durable_version:
            # every node's durable copy follows the shared document, so whichever node seeds
            # an emptied Redis seeds the current one
            try:
                await self.durable.save(associations)
                self._durable_version = associations.version
            except Exception as exc:
                log.warning("associations v%d not written to %s: %s", associations.version,
                            self.durable.describe(), exc)
        return associations

    async def offer(self, associations: Associations) -> bool:
        taken = await self.redis.eval(_OFFER, 2, *self.keys, json.dumps(associations.document),
                                      str(associations.version), self.channel)
        return bool(int(taken))

    async def save(self, associations: Associations) -> Associations:
        version = await self.redis.eval(
            _SAVE, 2, *self.keys, json.dumps(associations.document), self.channel
        )
        stored = dataclasses.replace(associations, version=int(version))
        try:
            await self.durable.save(stored)
        except Exception:
            log.exception("associations v%s shared, but not saved to %s",
                          version, self.durable.describe())
        return stored

    async def watch(self, changed: Changed) -> None:
        # every (re)subscription and every change triggers a re-read: a node that was cut
        # off while a PUT happened catches up as soon as Redis is back
        async for _ in subscription(self.url, self.channel):
            try:
                await changed()
            except Exception:
                log.exception("re-reading associations failed")

    async def close(self) -> None:
        await self.redis.aclose()
        if isinstance(self.redis, Redis):  # a pool given to a client stays open
            await self.redis.connection_pool.disconnect()
