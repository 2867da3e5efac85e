/**
 * Register a node with a heartbeat session, select and reserve a slot, watch a snapshot.
 *
 *   make run                                    # at the repository root: a sidecar on :50051
 *   cd clients/node && npm ci && npm run example -- 127.0.0.1:50051
 */

import {
  InvalidArgument,
  RegistryClient,
  ResourceExhausted,
  WatchEventType,
} from "../src";

async function main(target: string): Promise<void> {
  const client = new RegistryClient(target, { timeoutMs: 5_000 });
  const nodeId = `example-${process.pid}`;
  // Registers, then keeps one heartbeat stream alive (reconnects, re-registers).
  const session = client.heartbeatSession(
    {
      nodeId,
      address: "10.0.0.7:9000",
      capacity: 4,
      pools: ["translate"],
      langPairs: [{ src: "en", tgt: "de" }],
      services: [{ name: "marian", type: "engine", version: "1.12" }],
      labels: { zone: "eu-1" },
    },
    { ttlMs: 10_000, deregisterOnClose: true },
  );
  try {
    await session.start();
    await session.waitAcked(1, 5_000);
    console.log(`registered ${nodeId}; heartbeats acked: ${session.acked}`);

    const picked = await client.selectNodes({ poolId: "translate", langPair: ["en", "de"], count: 2 });
    console.log("selected:", picked.nodes.map((n) => n.nodeId), "eligible:", picked.breakdown.eligible);

    const slot = await client.reserveSlot(nodeId, `job-${process.pid}`, { leaseMs: 60_000 });
    console.log("running jobs:", slot.node.runningJobs);
    await client.releaseSlot(nodeId, `job-${process.pid}`);

    try {
      await client.schedule(`job2-${process.pid}`, { poolId: "translate", labels: { zone: "mars" } });
    } catch (err) {
      if (err instanceof ResourceExhausted) console.log("no slot; excluded by labels:", err.breakdown?.labels);
      else throw err;
    }
    try {
      await client.registerNode({ nodeId: "not valid!", capacity: 1 });
    } catch (err) {
      if (err instanceof InvalidArgument) console.log("invalid field:", err.field);
      else throw err;
    }

    // Snapshot first, then live changes; resumes from its last token on reconnect.
    for await (const event of client.watch({ poolId: "translate" })) {
      console.log(event.type, event.nodeId || event.node?.nodeId || "", event.version);
      if (event.type === WatchEventType.SNAPSHOT_END) break;
    }
  } finally {
    await session.close(); // deregisters: deregisterOnClose
    client.close();
  }
}

main(process.argv[2] ?? "127.0.0.1:50051").catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
