"""Keep a local view of a pool with Watch, and pick nodes for a job with SelectNodes.

Start a sidecar (``make run``) and a node (``examples/register_and_heartbeat.py``), then::

    python examples/select_and_watch.py [pool_id]

It prints the selection once, then every change to the pool as the watch reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys

from registry_client import RegistryClient, pb

TARGET = os.environ.get("REGISTRY_TARGET", "127.0.0.1:50051")

log = logging.getLogger("example")


async def select_once(client: RegistryClient, pool_id: str) -> None:
    response = await client.select_nodes(pool_id, lang_pair=("en", "de"), count=3)
    picked = ", ".join(n.node_id for n in response.nodes) or "nothing"
    b = response.breakdown
    log.info(
        "selected %s (considered=%d eligible=%d offline=%d draining=%d full=%d low_health=%d)",
        picked,
        b.considered,
        b.eligible,
        b.offline,
        b.draining,
        b.full,
        b.low_health,
    )


async def watch_pool(client: RegistryClient, pool_id: str) -> None:
    """Mirror the pool in ``view``; a new snapshot replaces it wholesale."""
    view: dict[str, pb.Node] = {}
    scratch: dict[str, pb.Node] = {}
    seen_snapshots = 0
    async with client.watch(pool_id) as watcher:
        async for event in watcher:
            if watcher.snapshots != seen_snapshots:  # a (new) snapshot began: start over
                seen_snapshots = watcher.snapshots
                scratch = {}
            if event.type == pb.WATCH_EVENT_TYPE_SNAPSHOT:
                scratch[event.node.node_id] = event.node
            elif event.type == pb.WATCH_EVENT_TYPE_SNAPSHOT_END:
                view = scratch
                log.info("snapshot: %d nodes %s", len(view), sorted(view))
            elif event.type == pb.WATCH_EVENT_TYPE_PUT:
                view[event.node.node_id] = event.node
                log.info(
                    "put %s status=%s running=%d/%d",
                    event.node.node_id,
                    pb.NodeStatus.Name(event.node.status),
                    event.node.running_jobs,
                    event.node.capacity,
                )
            elif event.type == pb.WATCH_EVENT_TYPE_DELETE:
                view.pop(event.node_id, None)
                log.info("delete %s", event.node_id)


async def main(pool_id: str) -> None:
    async with RegistryClient(TARGET) as client:
        await select_once(client, pool_id)
        await watch_pool(client, pool_id)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "translate"))
