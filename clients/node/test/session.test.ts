/**
 * HeartbeatSession (and Watcher reconnects) against a real sidecar this file owns: it
 * deregisters nodes under a running session, and kills and restarts the sidecar.
 */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  HeartbeatAction,
  HeartbeatSession,
  InvalidArgument,
  type NodeInit,
  NodeStatus,
  NotFound,
  type RegistryClient,
  type RegistryError,
  WatchEventType,
  silentLogger,
} from "../src";
import { Stack, eventually } from "./support/stack";

const TEST_TIMEOUT = { timeout: 40_000 };
/** Quick reconnects for tests; production defaults are 100 ms .. 5 s. */
const FAST_BACKOFF = { initialMs: 50, maxMs: 500, jitterMs: 50 };

let stack: Stack;
let client: RegistryClient;
let counter = 0;
const sessions: HeartbeatSession[] = [];

function uniqueId(prefix: string): string {
  counter += 1;
  return `${prefix}-${process.pid}-${counter}`;
}

function node(nodeId: string, extra: Partial<NodeInit> = {}): NodeInit {
  return { nodeId, capacity: 2, pools: ["hb"], langPairs: [{ src: "en", tgt: "de" }], ...extra };
}

function session(n: NodeInit, options: ConstructorParameters<typeof HeartbeatSession>[2] = {}): HeartbeatSession {
  const s = client.heartbeatSession(n, { backoff: FAST_BACKOFF, logger: silentLogger, ...options });
  sessions.push(s);
  return s;
}

before(async () => {
  stack = await Stack.start();
  client = stack.client({ timeoutMs: 3_000 });
});

after(async () => {
  await Promise.all(sessions.map((s) => s.close()));
  await stack?.stop();
});

describe("HeartbeatSession against a real sidecar", () => {
  test("registers, then heartbeats are acknowledged", TEST_TIMEOUT, async () => {
    const id = uniqueId("hb");
    const s = session(node(id), { ttlMs: 3_000, intervalMs: 100 });
    await s.start();
    assert.equal(s.registered?.nodeId, id);
    assert.equal(s.registered?.ttlMs, 3_000);
    await s.waitAcked(3, 10_000);
    assert.ok(s.sent >= 3);
    assert.equal(s.connected, true);
    assert.equal(s.running, true);
    assert.equal(s.lastResponse?.action, HeartbeatAction.CONTINUE);
    assert.equal(s.lastResponse?.status, NodeStatus.ONLINE);
    assert.ok((s.lastResponse?.deadlineMs ?? 0) > Date.now(), "deadline in the future");
    assert.equal(s.reregistrations, 0);
    assert.equal(s.reconnects, 0);
    assert.equal(s.buffered, 0);
    const status = await client.getStatus();
    assert.ok(status.heartbeatStreams >= 1, "the sidecar sees the stream");
    const got = await client.getNode(id);
    assert.ok(got.node.lastHeartbeatAt >= got.node.registeredAt);
    await s.close();
    assert.equal(s.running, false);
  });

  test("the interval follows the TTL (a third of it) unless fixed", TEST_TIMEOUT, async () => {
    const s = session(node(uniqueId("interval")), { ttlMs: 1_500 });
    assert.equal(s.currentIntervalMs, 500, "before the first ack: ttlMs / 3");
    await s.start();
    await s.waitAcked(2, 10_000);
    assert.equal(s.lastResponse?.intervalMs, 500, "the sidecar suggests ttl / 3");
    assert.equal(s.currentIntervalMs, 500);
    await s.close();
    assert.equal(session(node(uniqueId("x"))).currentIntervalMs, 1_000, "no TTL: 1 s");
  });

  test("reports metrics and running jobs", TEST_TIMEOUT, async () => {
    const id = uniqueId("metrics");
    let beats = 0;
    const s = session(node(id), {
      ttlMs: 3_000,
      intervalMs: 100,
      metricsProvider: () => ({ cpu: 0.5, gpu: 0.25, mem: 0.1, load: 0.75, errorRate: 0 }),
      jobsProvider: () => {
        beats += 1;
        return [];
      },
    });
    await s.start();
    await s.waitAcked(2, 10_000);
    assert.ok(beats >= 2);
    const got = await eventually(async () => {
      const n = (await client.getNode(id)).node;
      return n.metrics && n.metrics.cpu === 0.5 ? n : null;
    });
    assert.equal(got.metrics?.load, 0.75);
    assert.ok(got.healthScore > 0 && got.healthScore < 1);
    await s.close();
  });

  test("re-registers when the server answers REGISTER (node deregistered)", TEST_TIMEOUT, async () => {
    const id = uniqueId("rereg");
    const s = session(node(id), { ttlMs: 3_000, intervalMs: 100 });
    const actions: string[] = [];
    s.on("ack", (r) => actions.push(r.action));
    await s.start();
    await s.waitAcked(1, 10_000);
    assert.equal((await client.deregisterNode(id)).existed, true);
    await s.waitFor((x) => x.reregistrations >= 1, 10_000);
    assert.ok(actions.includes(HeartbeatAction.REGISTER), actions.join(","));
    const acked = s.acked;
    await s.waitAcked(acked + 2, 10_000);
    assert.equal(s.lastResponse?.action, HeartbeatAction.CONTINUE, "heartbeats go on, same stream");
    assert.equal(s.reconnects, 0);
    const back = await eventually(() => client.getNode(id));
    assert.equal(back.node.status, NodeStatus.ONLINE);
    await s.close();
  });

  test("close({ deregister: true }) ends the stream cleanly and removes the node", TEST_TIMEOUT, async () => {
    const id = uniqueId("close");
    const s = session(node(id), { ttlMs: 3_000, intervalMs: 100 });
    let stopped: RegistryError | null | undefined;
    s.on("stopped", (err) => (stopped = err));
    await s.start();
    await s.waitAcked(1, 10_000);
    const started = Date.now();
    await s.close({ deregister: true });
    assert.ok(Date.now() - started < 2_000, "close is prompt");
    assert.equal(stopped, null, "stopped without an error");
    assert.equal(s.running, false);
    assert.equal(s.error, null);
    await assert.rejects(eventually(() => client.getNode(id).then(() => false), 300), NotFound);
    await s.close(); // idempotent
    const sent = s.sent;
    await new Promise((r) => setTimeout(r, 250));
    assert.equal(s.sent, sent, "no heartbeats after close");
  });

  test("start() rejects on bad input instead of retrying", TEST_TIMEOUT, async () => {
    const s = session(node("not a valid id"));
    await assert.rejects(s.start(), InvalidArgument);
    assert.equal(s.running, false);
    assert.throws(() => client.heartbeatSession({ nodeId: "", capacity: 1 }), TypeError);
  });

  test("survives a sidecar restart: reconnects and is acknowledged again", TEST_TIMEOUT, async () => {
    const id = uniqueId("restart");
    const s = session(node(id, { pools: ["restartpool"] }), { ttlMs: 5_000, intervalMs: 100 });
    const disconnects: RegistryError[] = [];
    s.on("disconnected", (err) => disconnects.push(err));
    await s.start();
    await s.waitAcked(2, 10_000);

    // A watcher on the same sidecar must resume after the restart too.
    const watcher = client.watch({ poolId: "restartpool", backoff: FAST_BACKOFF });
    try {
      for (;;) {
        const r = await watcher.next();
        if (r.done || r.value.type === WatchEventType.SNAPSHOT_END) break;
      }
      const tokenBefore = watcher.resumeToken;

      const oldPid = stack.sidecar.pid;
      await stack.sidecar.kill();
      await eventually(() => disconnects.length > 0 || !s.connected, 5_000);
      await stack.sidecar.start(true); // same port: clients reconnect to the same target
      assert.notEqual(stack.sidecar.pid, oldPid);

      const ackedBefore = s.acked;
      await s.waitFor((x) => x.reconnects >= 1 && x.acked >= ackedBefore + 2, 20_000);
      assert.equal(s.connected, true);
      assert.equal(s.running, true);
      assert.ok(disconnects.length >= 1, "the break was seen");
      assert.ok(disconnects.every((e) => e.retryable || e.code !== undefined));
      assert.equal((await client.getNode(id)).node.status, NodeStatus.ONLINE);
      await eventually(async () => (await client.getStatus()).heartbeatStreams >= 1);

      // The watcher reconnects with its token and sees a node registered after the restart.
      const late = uniqueId("late");
      await client.registerNode(node(late, { pools: ["restartpool"] }));
      const deadline = Date.now() + 15_000;
      let put = null;
      while (put === null && Date.now() < deadline) {
        const r = await watcher.next();
        if (r.done) break;
        if (r.value.type === WatchEventType.PUT && r.value.nodeId === late) put = r.value;
      }
      assert.ok(put, "PUT for a node registered after the restart");
      assert.ok(watcher.reconnects >= 1);
      assert.notEqual(tokenBefore, "");
    } finally {
      watcher.close();
    }
    await s.close({ deregister: true });
  });
});
