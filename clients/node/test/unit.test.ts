/** Pieces that need no sidecar: backoff, error mapping, request building, proto lookup. */

import assert from "node:assert/strict";
import * as path from "node:path";
import { describe, test } from "node:test";

import { Metadata } from "@grpc/grpc-js";
import * as protobuf from "protobufjs";

import {
  AlreadyExists,
  Cancelled,
  DeadlineExceeded,
  FailedPrecondition,
  InvalidArgument,
  NotFound,
  RegistryClient,
  RegistryError,
  ResourceExhausted,
  STREAM_RETRYABLE_CODES,
  Status,
  StreamBroken,
  Unavailable,
  backoffDelayMs,
  findProtoPath,
  fromServiceError,
  loadProto,
  selectRequest,
} from "../src";

function serviceError(code: Status, details: string, metadata = new Metadata()): Error {
  return Object.assign(new Error(`${code} ${details}`), { code, details, metadata });
}

describe("backoffDelayMs", () => {
  test("doubles from the initial wait and stops at the maximum", () => {
    const noJitter = { initialMs: 100, maxMs: 1_000, jitterMs: 0 };
    assert.deepEqual(
      [1, 2, 3, 4, 5, 6].map((n) => backoffDelayMs(n, noJitter)),
      [100, 200, 400, 800, 1_000, 1_000],
    );
  });

  test("adds up to jitterMs of random time, still capped", () => {
    const options = { initialMs: 100, maxMs: 1_000, jitterMs: 50 };
    assert.equal(backoffDelayMs(1, options, () => 0.5), 125);
    assert.equal(backoffDelayMs(1, options, () => 0.999), 149.95);
    assert.equal(backoffDelayMs(10, options, () => 0.999), 1_000);
    for (let i = 0; i < 100; i++) {
      const delay = backoffDelayMs(2, options);
      assert.ok(delay >= 200 && delay < 250, String(delay));
    }
  });
});

describe("fromServiceError", () => {
  test("maps each status code to its class, keeping code, details and cause", () => {
    const cases: [Status, new (...args: never[]) => RegistryError][] = [
      [Status.INVALID_ARGUMENT, InvalidArgument],
      [Status.NOT_FOUND, NotFound],
      [Status.ALREADY_EXISTS, AlreadyExists],
      [Status.FAILED_PRECONDITION, FailedPrecondition],
      [Status.RESOURCE_EXHAUSTED, ResourceExhausted],
      [Status.UNAVAILABLE, Unavailable],
      [Status.DEADLINE_EXCEEDED, DeadlineExceeded],
      [Status.CANCELLED, Cancelled],
    ];
    for (const [code, cls] of cases) {
      const original = serviceError(code, "something");
      const error = fromServiceError(original);
      assert.ok(error instanceof cls, `${Status[code]} -> ${error.constructor.name}`);
      assert.ok(error instanceof RegistryError);
      assert.equal(error.code, code);
      assert.equal(error.codeName, Status[code]);
      assert.equal(error.details, "something");
      assert.equal(error.message, `${Status[code]}: something`);
      assert.equal(error.cause, original);
    }
    const other = fromServiceError(serviceError(Status.DATA_LOSS, "gone"));
    assert.equal(other.constructor, RegistryError);
    assert.equal(other.code, Status.DATA_LOSS);
  });

  test("InvalidArgument names the field", () => {
    const error = fromServiceError(
      serviceError(Status.INVALID_ARGUMENT, "node.pools[1]: must be 1-128 characters of [A-Za-z0-9._-]"),
    );
    assert.ok(error instanceof InvalidArgument);
    assert.equal(error.field, "node.pools[1]");
  });

  test("retryable codes", () => {
    assert.equal(new Unavailable("x").retryable, true);
    assert.equal(new StreamBroken("x").code, Status.UNAVAILABLE);
    assert.equal(new NotFound("x").retryable, false);
    assert.ok(STREAM_RETRYABLE_CODES.has(Status.RESOURCE_EXHAUSTED));
    assert.ok(!STREAM_RETRYABLE_CODES.has(Status.INVALID_ARGUMENT));
  });

  test("a non-gRPC error becomes a RegistryError UNKNOWN", () => {
    const error = fromServiceError(new TypeError("boom"));
    assert.equal(error.code, Status.UNKNOWN);
    assert.equal(error.details, "boom");
  });

  test("RESOURCE_EXHAUSTED decodes the breakdown from grpc-status-details-bin", () => {
    const proto = loadProto();
    const Breakdown = proto.root.lookupType("registry.v1.SelectionBreakdown");
    const StatusType = protobuf.Root.fromJSON({
      nested: {
        s: {
          nested: {
            Any: { fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } },
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "Any", id: 3 },
              },
            },
          },
        },
      },
    }).lookupType("s.Status");
    const bin = StatusType.encode(
      StatusType.fromObject({
        code: 8,
        message: "no free slot",
        details: [
          { type_url: "type.googleapis.com/other.Thing", value: new Uint8Array([1, 2]) },
          {
            type_url: "type.googleapis.com/registry.v1.SelectionBreakdown",
            value: Breakdown.encode(Breakdown.fromObject({ considered: 3, full: 2, draining: 1 })).finish(),
          },
        ],
      }),
    ).finish();
    const metadata = new Metadata();
    metadata.set("grpc-status-details-bin", Buffer.from(bin));
    const error = fromServiceError(
      serviceError(Status.RESOURCE_EXHAUSTED, "no free slot", metadata),
      (b) => proto.decodeBreakdown(b),
    );
    assert.ok(error instanceof ResourceExhausted);
    assert.equal(error.breakdown?.considered, 3);
    assert.equal(error.breakdown?.full, 2);
    assert.equal(error.breakdown?.draining, 1);
    assert.equal(error.breakdown?.eligible, 0);
    // Garbage details do not hide the status.
    const garbled = new Metadata();
    garbled.set("grpc-status-details-bin", Buffer.from([0xff, 0xff, 0xff]));
    const plain = fromServiceError(serviceError(Status.RESOURCE_EXHAUSTED, "x", garbled), (b) =>
      proto.decodeBreakdown(b),
    );
    assert.ok(plain instanceof ResourceExhausted);
    assert.equal(plain.breakdown, null);
  });
});

describe("requests", () => {
  test("selectRequest fills every field, accepting a [src, tgt] tuple", () => {
    assert.deepEqual(selectRequest({ poolId: "p", langPair: ["en", "de"], count: 2 }), {
      poolId: "p",
      langPair: { src: "en", tgt: "de" },
      requiredServices: [],
      labels: {},
      count: 2,
      excludeNodeIds: [],
      minHealth: 0,
    });
    assert.equal(selectRequest().langPair, null);
  });
});

describe("proto lookup", () => {
  test("finds the repository's proto above the package, and honours an explicit path", () => {
    const found = findProtoPath();
    assert.ok(found.endsWith(path.join("proto", "registry", "v1", "registry.proto")), found);
    assert.ok(!found.includes(`${path.sep}clients${path.sep}`), `proto copied? ${found}`);
    assert.equal(findProtoPath(found), found);
    assert.throws(() => findProtoPath("/nonexistent/registry.proto"), /not found/);
  });

  test("a client to a port nobody listens on fails Unavailable", async () => {
    const client = new RegistryClient("127.0.0.1:1", { timeoutMs: 2_000 });
    try {
      await assert.rejects(client.getStatus(), Unavailable);
    } finally {
      client.close();
    }
  });
});
