"""Recovery: get back to NORMAL as soon as Redis answers, then drain the buffer.

Order (each step bounded, so recovery always finishes whatever the live load does):

1. **Probe** until Redis answers (tenacity, exponential backoff with jitter).
2. **Restore** if Redis lost the data set (``registry.dataset.loss``): lift the version
   counter above everything watchers saw and register again the nodes whose heartbeat
   streams this sidecar holds, with the pools it knows. Bounded by the streams held.
3. **NORMAL**: from here live writes go straight to Redis.
4. **Catch up** the replica from the log (or reload it after a loss).
5. **Drain** the buffer in rounds, each a snapshot of what is buffered when it starts:
   commands in order, then heartbeats in batches. A heartbeat buffered for a node that
   has since sent a newer one straight to Redis is dropped, not replayed (the live path
   calls ``WriteBuffer.supersede``), and a live write waits for buffered writes to the
   same node, job or pool, so per key the acknowledged order holds. Nothing new enters
   the buffer while NORMAL except writes whose own deadline passed, so the rounds end.

An entry leaves the buffer only once Redis has it, so a failure midway loses nothing, and
a repeat is harmless (the scripts are idempotent).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

from registry import dataset
from registry.cache import Replica
from registry.changefeed import ChangeFeed
from registry.degradation.buffer import WriteBuffer
from registry.degradation.commands import Command, Register, ReserveLocal
from registry.degradation.local_slots import LocalSlots
from registry.errors import RegistryError, Unavailable
from registry.gateway import Gateway
from registry.model import HeartbeatIn, HeartbeatOutcome, Node, NodeSpec, NodeStatus

log = logging.getLogger(__name__)

HEARTBEAT_REPLAY_BATCH = 500


class Recovery:
    def __init__(
        self,
        gateway: Gateway,
        replica: Replica,
        feed: ChangeFeed,
        buffer: WriteBuffer,
        local: LocalSlots,
        *,
        live_nodes: Callable[[], Iterable[str]],
        stampede_jitter_s: float,
        rng: random.Random,
    ) -> None:
        self._gateway = gateway
        self._replica = replica
        self._feed = feed
        self._buffer = buffer
        self._local = local
        self._live_nodes = live_nodes
        self._jitter = stampede_jitter_s
        self._rng = rng
        self.rebuilds = 0
        self.replayed = 0

    async def restore(self) -> bool:
        """Redis answers: put back the data set if it was lost. True when it was."""
        gateway, replica = self._gateway, self._replica
        had = replica.version  # before asking (registry/dataset.py says why)
        version, epoch = await gateway.state()
        why = dataset.loss(version=version, had=had, epoch=epoch, known_epoch=gateway.epoch)
        await asyncio.sleep(self._rng.uniform(0, self._jitter))  # no stampede
        if why is not None:
            await self._rebuild(why)
        return why is not None

    async def catch_up(self, lost: bool) -> None:
        try:
            if lost:
                await self._feed.reload()
            else:
                await self._feed.catch_up()
        except Unavailable as exc:  # the version checker and the feed go on trying
            log.warning("catch-up after recovery failed: %s", exc)

    async def _rebuild(self, why: str) -> None:
        """Redis lost the data set: put back what this sidecar knows to be alive."""
        gateway, replica = self._gateway, self._replica
        old = gateway.epoch
        await gateway.ensure_epoch()
        await gateway.lift(replica.version)
        live = [n for i in self._live_nodes() if (n := replica.get(i)) is not None]
        for node in live:
            await gateway.register(spec_of(node), node.ttl_ms, adopt_ms=adopt_window(node))
            if node.status is NodeStatus.DRAINING:  # an operator's drain outlives the loss
                await gateway.drain(node.node_id)
        for pool in list(replica.pools.values()):
            await gateway.put_pool(pool)
        self.rebuilds += 1
        log.warning(
            "%s; epoch %s -> %s: registered %d live nodes and %d pools again",
            why,
            old,
            gateway.epoch,
            len(live),
            len(replica.pools),
        )

    async def drain_round(self) -> int:
        """Replay what the buffer holds now (not what arrives meanwhile); how many."""
        done = await self._replay_commands(len(self._buffer.ops))
        done += await self._replay_heartbeats(list(self._buffer.heartbeats))
        self.replayed += done
        return done

    async def _replay_commands(self, count: int) -> int:
        buffer = self._buffer
        done = 0
        while buffer.ops and done < count:
            seq, command = buffer.ops[0]
            await self._apply(command)  # Unavailable: stays buffered, replayed later
            buffer.pop_op(seq)
            done += 1
        return done

    async def _apply(self, command: Command[Any]) -> None:
        try:
            await command.run(self._gateway)
        except Unavailable:
            raise
        except RegistryError as exc:  # e.g. a drain of a node removed meanwhile
            log.info("buffered %s %s no longer applies: %s", command.kind, command.keys, exc)
            if isinstance(command, ReserveLocal):
                self._local.replayed(command.node_id, command.job_id, applied=False)
            return
        if isinstance(command, ReserveLocal):
            self._local.replayed(command.node_id, command.job_id, applied=True)

    async def _replay_heartbeats(self, node_ids: list[str]) -> int:
        buffer, gateway = self._buffer, self._gateway
        replayed = 0
        for start in range(0, len(node_ids), HEARTBEAT_REPLAY_BATCH):
            batch = [
                entry
                for i in node_ids[start : start + HEARTBEAT_REPLAY_BATCH]
                if (entry := buffer.heartbeats.get(i)) is not None
            ]
            results = await asyncio.gather(*(gateway.heartbeat(hb) for _, hb in batch))
            live = set(self._live_nodes())
            for (seq, hb), result in zip(batch, results, strict=True):
                if result.outcome is not HeartbeatOutcome.OK and hb.node_id in live:
                    await self._register_again(hb)
                buffer.pop_heartbeat(hb.node_id, seq)
            replayed += len(batch)
        return replayed

    async def _register_again(self, hb: HeartbeatIn) -> None:
        """The node expired meanwhile (or was lost with Redis) while its stream stayed
        here: register it again from what it registered last, then record the beat. A
        node whose stream is gone is left to register by itself (it may be gone)."""
        node = self._replica.get(hb.node_id)
        if node is None:
            return
        await Register(spec_of(node), node.ttl_ms, adopt_window(node)).run(self._gateway)
        await self._gateway.heartbeat(hb)


def adopt_window(node: Node) -> int:
    """How long a node registered again after a loss may bring back its jobs' slots by
    reporting them: a few heartbeats (three per TTL) at least, and 10 s."""
    return max(2 * node.ttl_ms, 10_000)


def spec_of(node: Node) -> NodeSpec:
    """What a node registered last, as the replica knows it."""
    return NodeSpec(
        node_id=node.node_id,
        address=node.address,
        pools=tuple(sorted(node.pools)),
        lang_pairs=tuple(sorted(node.lang_pairs, key=lambda p: (p.src, p.tgt))),
        services=node.services,
        labels=dict(node.labels),
        capacity=node.capacity,
    )
