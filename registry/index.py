"""Columnar index of the replica, so a selection over 10,000 nodes is a few array operations.

Each node owns a slot; its selection fields live in numpy columns at that slot, and its
memberships (pools, language pairs, services, labels) in sets of slots, turned into
boolean masks on first use and cached until the set changes. The replica keeps the index
in step (it is the only writer, on the event loop), so readers see a consistent index
without a lock.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import numpy as np
import numpy.typing as npt

from registry.model import LanguagePair, Node, NodeStatus

Mask = npt.NDArray[np.bool_]
Key = tuple[str, Hashable]
"""A membership: ("pool", id), ("lang", LanguagePair), ("svc", name), ("label", (k, v))."""

STATUS_CODE = {NodeStatus.ONLINE: 1, NodeStatus.DRAINING: 2, NodeStatus.OFFLINE: 3}
EMPTY = 0

METRIC_COLUMNS = ("cpu", "gpu", "mem", "load", "heartbeat_delay", "error_rate")
"""Column order of ``NodeIndex.metrics`` (the health score's inputs)."""


def pool_key(pool_id: str) -> Key:
    return ("pool", pool_id)


def lang_key(pair: LanguagePair) -> Key:
    return ("lang", pair)


def service_key(name: str) -> Key:
    return ("svc", name)


def label_key(name: str, value: str) -> Key:
    return ("label", (name, value))


def memberships(node: Node) -> frozenset[Key]:
    keys: set[Key] = {pool_key(p) for p in node.pools}
    keys.update(lang_key(p) for p in node.lang_pairs)
    keys.update(service_key(s) for s in node.service_names)
    keys.update(label_key(k, v) for k, v in node.labels.items())
    return frozenset(keys)


class NodeIndex:
    """Slots, columns and membership masks for every node of the replica."""

    def __init__(self, initial: int = 1024) -> None:
        initial = max(initial, 1)
        self._slot: dict[str, int] = {}
        self.ids: list[str] = []
        """Node id by slot ("" for a free slot)."""
        self._free: list[int] = []
        self._keys: dict[int, frozenset[Key]] = {}
        self._members: dict[Key, set[int]] = {}
        self._masks: dict[Key, Mask] = {}
        self.status = np.zeros(initial, np.int8)
        self.health = np.zeros(initial)
        self.running = np.zeros(initial, np.int64)
        self.capacity = np.zeros(initial, np.int64)
        self.metrics = np.zeros((initial, len(METRIC_COLUMNS)))
        self.confirmed = np.zeros(initial)
        """Monotonic time each entry was last confirmed by Redis (a change or a check)."""
        self.l1_due = np.zeros(initial)
        """Monotonic time each entry's L1 TTL (jittered) runs out: revalidate then."""

    @property
    def size(self) -> int:
        """Slots handed out so far (free ones included): the length of every mask."""
        return len(self.ids)

    def __len__(self) -> int:
        return len(self._slot)

    def slot(self, node_id: str) -> int | None:
        return self._slot.get(node_id)

    def put(self, node: Node) -> None:
        slot = self._slot.get(node.node_id)
        if slot is None:
            slot = self._allocate(node.node_id)
        self.status[slot] = STATUS_CODE[node.status]
        self.health[slot] = node.health_score
        self.running[slot] = node.running_jobs
        self.capacity[slot] = node.capacity
        m = node.metrics
        self.metrics[slot] = (m.cpu, m.gpu, m.mem, m.load, m.heartbeat_delay, m.error_rate)
        keys = memberships(node)
        old = self._keys.get(slot, frozenset())
        if keys != old:
            self._move(slot, old - keys, keys - old)
            self._keys[slot] = keys

    def confirm(self, node_id: str, now: float, l1_due: float) -> None:
        slot = self._slot.get(node_id)
        if slot is not None:
            self.confirmed[slot] = now
            self.l1_due[slot] = l1_due

    def remove(self, node_id: str) -> None:
        slot = self._slot.pop(node_id, None)
        if slot is None:
            return
        self._move(slot, self._keys.pop(slot, frozenset()), ())
        self.status[slot] = EMPTY
        self.ids[slot] = ""
        self._free.append(slot)

    def clear(self) -> None:
        self.__init__(max(len(self.status), 1024))  # type: ignore[misc]

    def used(self) -> Mask:
        out: Mask = self.status[: self.size] != EMPTY
        return out

    def has(self, key: Key) -> bool:
        """Whether any node holds ``key``."""
        return key in self._members

    def mask(self, key: Key) -> Mask:
        """Slots holding ``key``; cached until a member joins or leaves. Keys no node holds
        are not cached, so requests naming arbitrary keys cannot grow the cache."""
        members = self._members.get(key)
        if not members:
            return np.zeros(self.size, np.bool_)
        cached = self._masks.get(key)
        if cached is not None and len(cached) == self.size:
            return cached
        out = np.zeros(self.size, np.bool_)
        out[np.fromiter(members, np.intp, len(members))] = True
        self._masks[key] = out
        return out

    def any_of(self, keys: Iterable[Key]) -> Mask:
        out = np.zeros(self.size, np.bool_)
        for key in keys:
            out |= self.mask(key)
        return out

    def slots_of(self, node_ids: Iterable[str]) -> Mask:
        out = np.zeros(self.size, np.bool_)
        for node_id in node_ids:
            slot = self._slot.get(node_id)
            if slot is not None:
                out[slot] = True
        return out

    def _allocate(self, node_id: str) -> int:
        if self._free:
            slot = self._free.pop()
            self.ids[slot] = node_id
        else:
            slot = len(self.ids)
            self.ids.append(node_id)
            if slot >= len(self.status):
                self._grow()
        self._slot[node_id] = slot
        return slot

    def _grow(self) -> None:
        cap = len(self.status) * 2
        self.status = np.resize(self.status, cap)
        self.status[len(self.ids) - 1 :] = EMPTY
        self.health = np.resize(self.health, cap)
        self.running = np.resize(self.running, cap)
        self.capacity = np.resize(self.capacity, cap)
        metrics = np.zeros((cap, len(METRIC_COLUMNS)))
        metrics[: len(self.metrics)] = self.metrics
        self.metrics = metrics
        self.confirmed = np.resize(self.confirmed, cap)
        self.l1_due = np.resize(self.l1_due, cap)

    def _move(self, slot: int, leave: Iterable[Key], join: Iterable[Key]) -> None:
        for key in leave:
            members = self._members.get(key)
            if members is not None:
                members.discard(slot)
                if not members:
                    del self._members[key]
            self._masks.pop(key, None)
        for key in join:
            self._members.setdefault(key, set()).add(slot)
            self._masks.pop(key, None)
