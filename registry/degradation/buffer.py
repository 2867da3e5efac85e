"""The write buffer: writes acknowledged while Redis could not take them, kept in order
until they are replayed.

Commands are kept in the order they were acknowledged; heartbeats only as the latest per
node (liveness and metrics are all that matter, and a newer heartbeat sent straight to
Redis makes a buffered one pointless: ``supersede``). Both are bounded: a write past the
bound is refused UNAVAILABLE, never dropped after being acknowledged. Every entry is in
the journal (when there is one) before ``add`` returns.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from typing import Any

from registry.degradation.commands import (
    Command,
    command_from_record,
    heartbeat_from_record,
    heartbeat_record,
)
from registry.degradation.journal import Journal
from registry.errors import Unavailable
from registry.model import HeartbeatIn


class BufferFull(Unavailable):
    """Degraded, and the write buffer is at its bound: the write is refused, not lost."""


class WriteBuffer:
    def __init__(self, max_ops: int, max_heartbeats: int, journal: Journal | None = None) -> None:
        self.ops: deque[tuple[int, Command[Any]]] = deque()
        self.heartbeats: dict[str, tuple[int, HeartbeatIn]] = {}
        self._max_ops = max_ops
        self._max_heartbeats = max_heartbeats
        self._journal = journal
        self._seq = itertools.count(1)
        self._keys: Counter[str] = Counter()
        """How many buffered commands touch each key (``node:a``, ``job:j``...)."""
        self.refused = 0
        self.accepted: Counter[str] = Counter()
        """Writes taken into the buffer since start, by kind (``heartbeat`` included)."""
        self.superseded = 0
        """Buffered heartbeats dropped because a newer one reached Redis first."""

    def __len__(self) -> int:
        return len(self.ops) + len(self.heartbeats)

    def load(self) -> int:
        """Take back what the journal holds (after a restart); returns how many entries."""
        if self._journal is None:
            return 0
        done: set[int] = set()
        entries: list[tuple[int, str, dict[str, Any]]] = []
        for record in self._journal.read():
            if "done" in record:
                done.add(int(record["done"]))
            elif "seq" in record:
                entries.append((int(record["seq"]), record["kind"], record["cmd"]))
        top = 0
        for seq, kind, body in entries:
            top = max(top, seq)
            if seq in done:
                continue
            if kind == "heartbeat":
                hb = heartbeat_from_record(body)
                self.heartbeats[hb.node_id] = (seq, hb)
            else:
                command = command_from_record(kind, body)
                self.ops.append((seq, command))
                self._keys.update(command.keys)
        self._seq = itertools.count(top + 1)
        self._compact_if_needed(force=True)
        return len(self)

    def add(self, command: Command[Any]) -> None:
        if len(self.ops) >= self._max_ops:
            self.refused += 1
            raise BufferFull(
                f"registry degraded and its write buffer is full ({self._max_ops} "
                "writes); retry once Redis is back"
            )
        seq = self._record(command.kind, command.to_record())
        self.ops.append((seq, command))
        self._keys.update(command.keys)
        self.accepted[command.kind] += 1

    def add_heartbeat(self, hb: HeartbeatIn) -> None:
        """The latest heartbeat per node is all that matters (liveness, metrics)."""
        if hb.node_id not in self.heartbeats and len(self.heartbeats) >= self._max_heartbeats:
            self.refused += 1
            raise BufferFull(
                f"registry degraded and {self._max_heartbeats} nodes' heartbeats "
                "are buffered; retry once Redis is back"
            )
        seq = self._record("heartbeat", heartbeat_record(hb))
        self.heartbeats[hb.node_id] = (seq, hb)
        self.accepted["heartbeat"] += 1

    def supersede(self, node_id: str) -> None:
        """A newer heartbeat of the node is on its way to Redis: the buffered one is moot."""
        entry = self.heartbeats.pop(node_id, None)
        if entry is not None:
            self.superseded += 1
            self._done(entry[0])

    def pending(self, keys: tuple[str, ...]) -> bool:
        """Some buffered command touches one of ``keys``."""
        return any(self._keys.get(k) for k in keys)

    def pending_node(self, node_id: str) -> bool:
        """Some buffered command touches the node (a register not replayed yet: a live
        heartbeat would find the node unknown). Cheap when nothing is buffered."""
        return bool(self.ops) and bool(self._keys.get(f"node:{node_id}"))

    def pop_op(self, seq: int) -> None:
        """The oldest command reached Redis (or no longer applies)."""
        head, command = self.ops[0]
        assert head == seq, "commands leave the buffer in order"
        self.ops.popleft()
        self._keys.subtract(command.keys)
        for k in command.keys:
            if self._keys[k] <= 0:
                del self._keys[k]
        self._done(seq)

    def pop_heartbeat(self, node_id: str, seq: int) -> None:
        """A replayed heartbeat reached Redis; a newer one buffered meanwhile stays."""
        entry = self.heartbeats.get(node_id)
        if entry is not None and entry[0] == seq:
            del self.heartbeats[node_id]
        self._done(seq)

    def _record(self, kind: str, body: dict[str, Any]) -> int:
        seq = next(self._seq)
        if self._journal is not None:
            self._journal.append({"seq": seq, "kind": kind, "cmd": body})
        return seq

    def _done(self, seq: int) -> None:
        if self._journal is None:
            return
        if not self.ops and not self.heartbeats:
            self._journal.clear()
            return
        self._journal.append({"done": seq})
        self._compact_if_needed()

    def _compact_if_needed(self, force: bool = False) -> None:
        journal = self._journal
        if journal is None:
            return
        if not self.ops and not self.heartbeats:
            journal.clear()
        elif force or journal.should_compact(len(self)):
            journal.rewrite(self._live_records())

    def _live_records(self) -> list[dict[str, Any]]:
        records = [
            {"seq": seq, "kind": command.kind, "cmd": command.to_record()}
            for seq, command in self.ops
        ]
        records += [
            {"seq": seq, "kind": "heartbeat", "cmd": heartbeat_record(hb)}
            for seq, hb in self.heartbeats.values()
        ]
        return records
