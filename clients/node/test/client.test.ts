/** RegistryClient against a real sidecar and a real redis-server started for this file. */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import * as path from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";

import {
  AlreadyExists,
  Cancelled,
  DeadlineExceeded,
  FailedPrecondition,
  InvalidArgument,
  type NodeInit,
  NodeStatus,
  NotFound,
  type RegistryClient,
  RegistryError,
  ResourceExhausted,
  Status,
  type WatchEvent,
  WatchEventType,
  type Watcher,
} from "../src";
import { Stack, eventually } from "./support/stack";

const TEST_TIMEOUT = { timeout: 30_000 };

let stack: Stack;
let client: RegistryClient;
let counter = 0;

/** A node id no other test uses. */
function uniqueId(prefix: string): string {
  counter += 1;
  return `${prefix}-${process.pid}-${counter}`;
}

function node(overrides: Partial<NodeInit> & { nodeId: string }): NodeInit {
  return {
    address: "10.0.0.1:9000",
    capacity: 2,
    pools: ["translate"],
    langPairs: [{ src: "en", tgt: "de" }],
    services: [{ name: "marian", type: "engine", version: "1.12" }],
    labels: { zone: "eu-1" },
    ...overrides,
  };
}

/** Read events until `predicate` matches one; fails after `timeoutMs`. */
async function nextMatching(
  watcher: Watcher,
  predicate: (event: WatchEvent) => boolean,
  timeoutMs = 10_000,
): Promise<WatchEvent> {
  const timeout = new Promise<never>((_, reject) => {
    const timer = setTimeout(() => reject(new Error(`no matching watch event in ${timeoutMs} ms`)), timeoutMs);
    timer.unref();
  });
  const read = (async () => {
    for (;;) {
      const result = await watcher.next();
      if (result.done) throw new Error("watch ended");
      if (predicate(result.value)) return result.value;
    }
  })();
  return Promise.race([read, timeout]);
}

before(async () => {
  stack = await Stack.start();
  client = stack.client();
});

after(async () => {
  await stack?.stop();
});

describe("RegistryClient against a real sidecar", () => {
  test("getStatus and health report a ready sidecar", TEST_TIMEOUT, async () => {
    const status = await client.getStatus();
    assert.equal(status.ready, true);
    assert.equal(status.mode, "NORMAL");
    assert.equal(status.namespace, stack.sidecar.namespace);
    assert.equal(typeof status.version, "number");
    assert.ok(status.uptimeMs > 0);
    assert.equal(await client.checkHealth(), "SERVING");
    assert.equal(await client.checkHealth("registry.v1.RegistryService"), "SERVING");
  });

  test("registerNode then getNode returns the stored node", TEST_TIMEOUT, async () => {
    const id = uniqueId("reg");
    const registered = await client.registerNode(node({ nodeId: id, capacity: 3 }), { ttlMs: 20_000 });
    assert.equal(registered.node.nodeId, id);
    assert.equal(registered.node.status, NodeStatus.ONLINE);
    assert.equal(registered.node.ttlMs, 20_000);
    assert.ok(registered.node.version > 0);

    const got = await client.getNode(id);
    assert.equal(got.node.nodeId, id);
    assert.equal(got.node.address, "10.0.0.1:9000");
    assert.equal(got.node.capacity, 3);
    assert.deepEqual(got.node.pools, ["translate"]);
    assert.deepEqual(got.node.langPairs, [{ src: "en", tgt: "de" }]);
    assert.deepEqual(got.node.services, [{ name: "marian", type: "engine", version: "1.12" }]);
    assert.deepEqual(got.node.labels, { zone: "eu-1" });
    assert.equal(got.node.runningJobs, 0);
    assert.ok(got.node.registeredAt > 1_600_000_000_000, "registeredAt is ms since the epoch");
    assert.ok(got.freshness.version >= registered.node.version);
    assert.equal(got.freshness.degraded, false);
  });

  test("getNode of an unknown node rejects NotFound", TEST_TIMEOUT, async () => {
    await assert.rejects(client.getNode(uniqueId("ghost")), (err) => {
      assert.ok(err instanceof NotFound, String(err));
      assert.equal(err.code, Status.NOT_FOUND);
      return true;
    });
  });

  test("deregisterNode is idempotent", TEST_TIMEOUT, async () => {
    const id = uniqueId("dereg");
    await client.registerNode(node({ nodeId: id }));
    assert.equal((await client.deregisterNode(id)).existed, true);
    assert.equal((await client.deregisterNode(id)).existed, false);
    await assert.rejects(client.getNode(id), NotFound);
  });

  test("listNodes filters by pool, language pair, labels and status", TEST_TIMEOUT, async () => {
    const pool = uniqueId("listpool");
    const a = uniqueId("list-a");
    const b = uniqueId("list-b");
    const c = uniqueId("list-c");
    await client.registerNode(node({ nodeId: a, pools: [pool], labels: { zone: "eu-1" } }));
    await client.registerNode(
      node({ nodeId: b, pools: [pool], langPairs: [{ src: "en", tgt: "fr" }], labels: { zone: "us-1" } }),
    );
    await client.registerNode(node({ nodeId: c, pools: ["elsewhere"] }));
    await client.drainNode(b);

    const ids = async (filter: Parameters<RegistryClient["listNodes"]>[0]) =>
      (await client.listNodes(filter)).nodes.map((n) => n.nodeId).sort();

    assert.deepEqual(await ids({ poolId: pool }), [a, b].sort());
    assert.deepEqual(await ids({ poolId: pool, langPair: ["en", "fr"] }), [b]);
    assert.deepEqual(await ids({ poolId: pool, langPair: { src: "en", tgt: "de" } }), [a]);
    assert.deepEqual(await ids({ poolId: pool, labels: { zone: "us-1" } }), [b]);
    assert.deepEqual(await ids({ poolId: pool, status: NodeStatus.DRAINING }), [b]);
    assert.deepEqual(await ids({ poolId: pool, status: NodeStatus.ONLINE }), [a]);
    const all = await client.listNodes();
    for (const id of [a, b, c]) assert.ok(all.nodes.some((n) => n.nodeId === id), id);
    assert.ok(all.freshness.version > 0);
  });

  test("selectNodes applies filters and explains exclusions", TEST_TIMEOUT, async () => {
    const pool = uniqueId("selpool");
    const good1 = uniqueId("sel-good1");
    const good2 = uniqueId("sel-good2");
    const wrongPair = uniqueId("sel-pair");
    const noService = uniqueId("sel-svc");
    const excluded = uniqueId("sel-excl");
    await client.registerNode(node({ nodeId: good1, pools: [pool] }));
    await client.registerNode(node({ nodeId: good2, pools: [pool], capacity: 4 }));
    await client.registerNode(node({ nodeId: wrongPair, pools: [pool], langPairs: [{ src: "fr", tgt: "en" }] }));
    await client.registerNode(node({ nodeId: noService, pools: [pool], services: [] }));
    await client.registerNode(node({ nodeId: excluded, pools: [pool] }));

    const picked = await client.selectNodes({
      poolId: pool,
      langPair: ["en", "de"],
      requiredServices: ["marian"],
      excludeNodeIds: [excluded],
      count: 5,
    });
    assert.deepEqual(picked.nodes.map((n) => n.nodeId).sort(), [good1, good2].sort());
    const bd = picked.breakdown;
    assert.equal(bd.eligible, 2);
    assert.equal(bd.wrongLangPair, 1);
    assert.equal(bd.missingService, 1);
    assert.equal(bd.excludedId, 1);
    assert.ok(bd.wrongPool >= 0);
    const sum =
      bd.excludedId + bd.offline + bd.draining + bd.wrongPool + bd.wrongLangPair +
      bd.missingService + bd.labels + bd.lowHealth + bd.full + bd.eligible;
    assert.equal(bd.considered, sum, "considered is the sum of every other count");

    const one = await client.selectNodes({ poolId: pool, langPair: ["en", "de"], requiredServices: ["marian"] });
    assert.equal(one.nodes.length, 1, "count 0 means one");

    const none = await client.selectNodes({ poolId: pool, labels: { zone: "nowhere" } });
    assert.equal(none.nodes.length, 0);
    assert.equal(none.breakdown.labels, 5);
  });

  test("reserveSlot and releaseSlot are exact and idempotent", TEST_TIMEOUT, async () => {
    const id = uniqueId("slot");
    const other = uniqueId("slot-other");
    const job = uniqueId("job");
    await client.registerNode(node({ nodeId: id, capacity: 1 }));
    await client.registerNode(node({ nodeId: other, capacity: 1 }));

    const first = await client.reserveSlot(id, job, { leaseMs: 30_000 });
    assert.equal(first.created, true);
    assert.equal(first.buffered, false, "granted by Redis, not from the local view");
    assert.equal(first.node.runningJobs, 1);
    assert.ok(first.leaseDeadlineMs > Date.now() + 20_000);
    const again = await client.reserveSlot(id, job, { leaseMs: 30_000 });
    assert.equal(again.created, false, "a repeat renews the lease");
    assert.equal(again.node.runningJobs, 1);

    await assert.rejects(client.reserveSlot(id, uniqueId("job")), ResourceExhausted, "node is full");
    await assert.rejects(client.reserveSlot(other, job), AlreadyExists, "job held elsewhere");

    const released = await client.releaseSlot(id, job);
    assert.equal(released.released, true);
    assert.equal(released.node?.runningJobs, 0);
    assert.equal((await client.releaseSlot(id, job)).released, false);

    await client.drainNode(id);
    await assert.rejects(client.reserveSlot(id, uniqueId("job")), FailedPrecondition);
    await assert.rejects(client.reserveSlot(uniqueId("ghost"), uniqueId("job")), NotFound);
  });

  test("schedule reserves on an eligible node, and RESOURCE_EXHAUSTED carries the breakdown", TEST_TIMEOUT, async () => {
    const pool = uniqueId("schedpool");
    const id = uniqueId("sched");
    await client.registerNode(node({ nodeId: id, pools: [pool], capacity: 1 }));

    const job = uniqueId("job");
    const done = await client.schedule(job, { poolId: pool, langPair: ["en", "de"] }, { leaseMs: 30_000 });
    assert.equal(done.node.nodeId, id);
    assert.equal(done.created, true);
    assert.equal(done.buffered, false);
    assert.ok(done.attempts >= 1);
    assert.equal(done.node.runningJobs, 1);
    assert.ok(done.leaseDeadlineMs > 0);
    const retried = await client.schedule(job, { poolId: pool }, { leaseMs: 30_000 });
    assert.equal(retried.created, false, "idempotent by job id");
    assert.equal(retried.node.nodeId, id);

    await assert.rejects(client.schedule(uniqueId("job"), { poolId: pool }), (err) => {
      assert.ok(err instanceof ResourceExhausted, String(err));
      assert.equal(err.code, Status.RESOURCE_EXHAUSTED);
      assert.ok(err.breakdown, "breakdown decoded from the status details");
      assert.equal(err.breakdown.full, 1);
      assert.equal(err.breakdown.eligible, 0);
      return true;
    });
  });

  test("bad input rejects InvalidArgument naming the field", TEST_TIMEOUT, async () => {
    await assert.rejects(
      client.registerNode(node({ nodeId: uniqueId("bad"), pools: ["ok", "not ok!"] })),
      (err) => {
        assert.ok(err instanceof InvalidArgument, String(err));
        assert.equal(err.code, Status.INVALID_ARGUMENT);
        assert.equal(err.field, "node.pools[1]");
        assert.match(err.details, /^node\.pools\[1\]: /);
        return true;
      },
    );
    await assert.rejects(client.registerNode(node({ nodeId: "spaces are bad" })), (err) => {
      assert.ok(err instanceof InvalidArgument);
      assert.equal(err.field, "node.node_id");
      return true;
    });
    await assert.rejects(client.registerNode(node({ nodeId: uniqueId("cap"), capacity: -1 })), (err) => {
      assert.ok(err instanceof InvalidArgument);
      assert.equal(err.field, "node.capacity");
      return true;
    });
    await assert.rejects(client.selectNodes({ minHealth: 2 }), (err) => {
      assert.ok(err instanceof InvalidArgument);
      assert.match(err.field, /min_health/);
      return true;
    });
  });

  test("deadlines and cancellation map to their classes", TEST_TIMEOUT, async () => {
    await assert.rejects(client.getStatus({ deadline: Date.now() - 1 }), DeadlineExceeded);
    const controller = new AbortController();
    controller.abort();
    await assert.rejects(client.getStatus({ signal: controller.signal }), Cancelled);
    // A generous per-call timeout overrides the client default and succeeds.
    assert.equal((await client.getStatus({ timeoutMs: 10_000 })).ready, true);
  });

  test("pools: putPool, getPool, listPools", TEST_TIMEOUT, async () => {
    const poolId = uniqueId("pool");
    const put = await client.putPool({
      poolId,
      langPairs: [{ src: "en", tgt: "de" }],
      requiredServices: ["marian"],
      labels: { tier: "gold" },
      minHealth: 0.25,
      weights: { cpu: 1, gpu: 0, mem: 0, load: 1, heartbeatDelay: 0, errorRate: 1, freeCapacity: 2 },
    });
    assert.equal(put.pool.poolId, poolId);
    assert.ok(put.pool.version > 0);

    const got = await client.getPool(poolId);
    assert.deepEqual(got.pool.langPairs, [{ src: "en", tgt: "de" }]);
    assert.deepEqual(got.pool.requiredServices, ["marian"]);
    assert.deepEqual(got.pool.labels, { tier: "gold" });
    assert.equal(got.pool.minHealth, 0.25);
    assert.equal(got.pool.weights?.freeCapacity, 2);
    assert.equal(got.pool.weights?.errorRate, 1);

    const plain = uniqueId("pool-plain");
    await client.putPool({ poolId: plain });
    assert.equal((await client.getPool(plain)).pool.weights, null, "unset weights stay unset");

    const listed = await client.listPools();
    const ids = listed.pools.map((p) => p.poolId);
    assert.ok(ids.includes(poolId) && ids.includes(plain), ids.join(","));
    await assert.rejects(client.getPool(uniqueId("nopool")), NotFound);
    await assert.rejects(client.putPool({ poolId: "bad pool" }), InvalidArgument);
  });

  test("watch sends a snapshot, then PUT and DELETE for a registration", TEST_TIMEOUT, async () => {
    const pool = uniqueId("watchpool");
    const before = uniqueId("watch-before");
    await client.registerNode(node({ nodeId: before, pools: [pool] }));

    const watcher = client.watch({ poolId: pool });
    try {
      const snapshot = await nextMatching(watcher, (e) => e.type === WatchEventType.SNAPSHOT);
      assert.equal(snapshot.node?.nodeId, before);
      await nextMatching(watcher, (e) => e.type === WatchEventType.SNAPSHOT_END);
      assert.equal(watcher.snapshots, 1);
      assert.notEqual(watcher.resumeToken, "");

      const id = uniqueId("watch-new");
      const registered = await client.registerNode(node({ nodeId: id, pools: [pool] }));
      const put = await nextMatching(watcher, (e) => e.type === WatchEventType.PUT && e.nodeId === id);
      assert.equal(put.node?.nodeId, id);
      assert.equal(put.node?.status, NodeStatus.ONLINE);
      assert.ok(put.version >= registered.node.version);

      await client.deregisterNode(id);
      const del = await nextMatching(watcher, (e) => e.type === WatchEventType.DELETE && e.nodeId === id);
      assert.ok(del.version > put.version);
      assert.equal(watcher.lastVersion, del.version);
      assert.equal(watcher.reconnects, 0);
    } finally {
      watcher.close();
    }
    assert.deepEqual(await watcher.next(), { done: true, value: undefined });
  });

  test("watch works with for await and stops on break", TEST_TIMEOUT, async () => {
    const pool = uniqueId("forawait");
    const id = uniqueId("fa");
    await client.registerNode(node({ nodeId: id, pools: [pool] }));
    const seen: string[] = [];
    const watcher = client.watch({ poolId: pool });
    for await (const event of watcher) {
      seen.push(event.type);
      if (event.type === WatchEventType.SNAPSHOT_END) break;
    }
    assert.deepEqual(seen, [WatchEventType.SNAPSHOT, WatchEventType.SNAPSHOT_END]);
    assert.equal(watcher.connected, false, "break closed the stream");
    await eventually(async () => (await client.getStatus()).watchers === 0);
  });

  test("watch with a bad pool id throws InvalidArgument at once", TEST_TIMEOUT, async () => {
    const watcher = client.watch({ poolId: "bad pool!" });
    try {
      await assert.rejects(watcher.next(), (err) => {
        assert.ok(err instanceof InvalidArgument, String(err));
        assert.equal(err.field, "pool_id");
        return true;
      });
    } finally {
      watcher.close();
    }
  });

  test("errors are RegistryErrors carrying the code name", TEST_TIMEOUT, async () => {
    const err = await client.getNode(uniqueId("none")).catch((e: unknown) => e);
    assert.ok(err instanceof RegistryError);
    assert.equal(err.codeName, "NOT_FOUND");
    assert.equal(err.retryable, false);
  });

  test("examples/quickstart runs against the sidecar", TEST_TIMEOUT, async () => {
    const script = path.join(__dirname, "..", "examples", "quickstart.js");
    const { stdout } = await promisify(execFile)(process.execPath, [script, stack.sidecar.target], {
      timeout: 20_000,
    });
    assert.match(stdout, /registered example-\d+; heartbeats acked: [1-9]/);
    assert.match(stdout, /running jobs: 1/);
    assert.match(stdout, /no slot; excluded by labels: [1-9]/);
    assert.match(stdout, /invalid field: node\.node_id/);
    assert.match(stdout, /WATCH_EVENT_TYPE_SNAPSHOT_END/);
  });
});
