"""Pick a node for a job, run it, and follow the pool, with the blocking client.

For scripts and threaded programs that have no event loop. Start a sidecar (``make run``)
and a node (``examples/register_and_heartbeat.py``), then::

    python examples/sync_select.py [pool_id]

It prints a selection with the reasons other nodes were left out, schedules a job (select
and reserve in one call), releases it, then prints the pool's changes until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from registry_client import NotFound, ResourceExhausted, SyncRegistryClient, Unavailable, pb

TARGET = os.environ.get("REGISTRY_TARGET", "127.0.0.1:50051")

log = logging.getLogger("example")

# UNAVAILABLE is the contract's "retry": the sidecar is starting, or Redis is unreachable
# and a slot cannot be promised. Schedule is idempotent by job id, so retrying it with the
# same id never takes a second slot.
RETRY = Retrying(
    retry=retry_if_exception_type(Unavailable),
    wait=wait_exponential_jitter(multiplier=0.2, max=2.0),
    stop=stop_after_delay(30),
    before_sleep=lambda state: log.info("unavailable, retrying (attempt %d)", state.attempt_number),
    reraise=True,
)


def select_and_run(client: SyncRegistryClient, pool_id: str) -> None:
    picked = RETRY(client.select_nodes, pool_id, lang_pair=("en", "de"), count=3)
    b = picked.breakdown
    log.info(
        "candidates %s (considered=%d eligible=%d draining=%d full=%d)",
        [n.node_id for n in picked.nodes],
        b.considered,
        b.eligible,
        b.draining,
        b.full,
    )

    job_id = f"job-{uuid.uuid4().hex[:8]}"
    try:
        scheduled = RETRY(client.schedule, job_id, pool_id, lang_pair=("en", "de"), lease_ms=60_000)
    except ResourceExhausted as exc:  # no node with a free slot
        log.info("no capacity for %s: %s", job_id, exc.details)
        return
    node = scheduled.node
    log.info(
        "%s runs on %s (%s), %d/%d slots used",
        job_id,
        node.node_id,
        node.address,
        node.running_jobs,
        node.capacity,
    )
    # ... send the job to node.address; when it finishes:
    with contextlib.suppress(NotFound):  # the node may have gone meanwhile
        RETRY(client.release_slot, node.node_id, job_id)  # idempotent: safe to retry


def follow(client: SyncRegistryClient, pool_id: str) -> None:
    """Print every change; the watcher reconnects and resumes by itself."""
    with client.watch(pool_id) as watcher:
        for event in watcher:
            kind = pb.WatchEventType.Name(event.type).removeprefix("WATCH_EVENT_TYPE_")
            if event.type in (pb.WATCH_EVENT_TYPE_SNAPSHOT, pb.WATCH_EVENT_TYPE_PUT):
                status = pb.NodeStatus.Name(event.node.status).removeprefix("NODE_STATUS_")
                log.info("%s %s %s", kind, event.node.node_id, status)
            elif event.type == pb.WATCH_EVENT_TYPE_DELETE:
                log.info("%s %s", kind, event.node_id)


def main(pool_id: str) -> None:
    with SyncRegistryClient(TARGET) as client:
        select_and_run(client, pool_id)
        follow(client, pool_id)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1] if len(sys.argv) > 1 else "translate")
