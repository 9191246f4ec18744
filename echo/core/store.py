"""Where the associations document lives: one interface, one class per backend.

The server holds the current :class:`Associations` in memory (the hot path reads it on every
publish) and asks a store to load it at start and to keep it when an admin PUTs a new one.
"""

from __future__ import annotations

import abc
import asyncio
import json
import os
import tempfile
from pathlib import Path

from echo.core.associations import Associations, parse_associations_text


class AssociationsStore(abc.ABC):
    @abc.abstractmethod
    async def load(self) -> Associations:
        """The stored document, validated; raise AssociationsError if it is broken."""

    @abc.abstractmethod
    async def save(self, associations: Associations) -> None:
        """Keep ``associations`` durably; the next ``load`` returns it."""

    def describe(self) -> str:
        return type(self).__name__


class MemoryStore(AssociationsStore):
    """Keeps the document in this process only: for tests and throwaway servers."""

    def __init__(self, associations: Associations | None = None) -> None:
        self._current = associations or Associations.empty()

    async def load(self) -> Associations:
        return self._current

    async def save(self, associations: Associations) -> None:
        self._current = associations


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

    async def save(self, associations: Associations) -> None:
        await asyncio.to_thread(self._save, associations)

    def _save(self, associations: Associations) -> None:
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
