"""The write buffer's journal: acknowledged writes survive a restart of the sidecar.

An append-only file of JSON lines in the data directory. Each buffered write is one line
``{"seq": n, "kind": ..., "cmd": {...}}`` (a heartbeat is kind ``heartbeat``), written
with one ``write`` on an ``O_APPEND`` descriptor before the write is acknowledged; a
replayed write adds ``{"done": n}``. On start the file is read back (a torn last line,
from a crash mid-write, is skipped: that write was never acknowledged) and what is not
done goes back into the buffer. The file is emptied whenever the buffer drains, and
rewritten with only the live entries when it grows much larger than they are.

Durability: the lines reach the kernel before the acknowledgement, so a crash or
``kill -9`` of the sidecar loses nothing; ``fsync`` (off by default, it costs a disk
flush per write) also covers a crash of the machine.

An exclusive ``flock`` on the file keeps a second sidecar off the same data directory.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COMPACT_MIN_BYTES = 8 * 1024 * 1024
"""Rewrite the journal once it is this large and four times what its live entries need."""


class JournalLocked(RuntimeError):
    """Another sidecar holds this journal: two sidecars must not share a data directory."""


class Journal:
    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        self.path = path
        self._fsync = fsync
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise JournalLocked(
                f"{path} is locked by another sidecar: give each sidecar a data "
                "directory of its own (--data-dir)"
            ) from None
        self.size = os.fstat(self._fd).st_size
        self.appended = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the lock
            self._fd = -1

    def read(self) -> Iterator[dict[str, Any]]:
        """Every complete record, oldest first."""
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except ValueError:
                    log.warning("journal %s: line %d is torn; skipped", self.path, number)
                    continue
                if isinstance(record, dict):
                    yield record

    def append(self, record: dict[str, Any]) -> None:
        self._write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self.appended += 1

    def _write(self, data: bytes) -> None:
        os.write(self._fd, data)
        if self._fsync:
            os.fsync(self._fd)
        self.size += len(data)

    def clear(self) -> None:
        """The buffer drained: nothing in the journal is needed any more."""
        if self.size:
            os.ftruncate(self._fd, 0)
            self.size = 0

    def should_compact(self, live: int) -> bool:
        return self.size > COMPACT_MIN_BYTES and self.size > 4 * 256 * max(live, 1)

    def rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        """Replace the file's content with ``records`` (the live entries), atomically
        enough: the new content is written to a temporary file, synced, renamed over the
        old one, and the lock moves to it."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for record in records:
                f.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(tmp, os.O_RDWR | os.O_APPEND)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(tmp, self.path)
        old, self._fd = self._fd, fd
        os.close(old)
        self.size = os.fstat(fd).st_size
