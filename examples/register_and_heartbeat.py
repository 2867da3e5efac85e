"""Register a node with the sidecar and keep it alive until Ctrl-C.

Start a sidecar first (``make run``), then::

    python examples/register_and_heartbeat.py [node_id]

The session survives sidecar restarts: stop and restart ``make run`` and watch the log
say the heartbeat stream was re-established.
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


def current_metrics() -> pb.NodeMetrics:
    """What a real node would measure; here the 1-minute load average stands in for all."""
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    return pb.NodeMetrics(cpu=min(load, 1.0), load=min(load, 1.0))


async def main(node_id: str) -> None:
    node = pb.Node(
        node_id=node_id,
        address="10.0.0.1:9000",
        capacity=4,
        pools=["translate"],
        lang_pairs=[pb.LanguagePair(src="en", tgt="de")],
        services=[pb.InstalledService(name="marian", type="engine", version="1.12")],
        labels={"zone": "local"},
    )
    running_jobs: set[str] = set()  # a real node fills this as it takes jobs
    async with RegistryClient(TARGET) as client:
        session = client.heartbeat_session(
            node,
            ttl_ms=10_000,
            metrics_provider=current_metrics,
            jobs_provider=lambda: running_jobs,
            deregister_on_close=True,  # leave the registry at once instead of expiring
        )
        async with session:
            await session.wait_acked(1, timeout=10)
            log.info("registered %s; heartbeating (Ctrl-C to stop)", node_id)
            while True:
                await asyncio.sleep(5)
                log.info(
                    "sent=%d acked=%d connected=%s reconnects=%d reregistrations=%d",
                    session.sent,
                    session.acked,
                    session.connected,
                    session.reconnects,
                    session.reregistrations,
                )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "example-node-1"))
