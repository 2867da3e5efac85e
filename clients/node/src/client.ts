/**
 * RegistryClient: the promise-based client of `registry.v1.RegistryService`.
 *
 * One method per unary RPC. Every method resolves to the RPC's *response message* (never
 * a bare node), so the freshness of reads, the `created`/`released` flags and lease
 * deadlines are never thrown away: `(await client.getNode("n1")).node` is the node.
 * Failed RPCs reject with the `errors.ts` hierarchy (`NotFound`, `InvalidArgument`, ...).
 *
 * The two streams get helpers that keep them alive across sidecar restarts:
 * `heartbeatSession()` and `watch()`.
 */

import * as grpc from "@grpc/grpc-js";
import * as protobuf from "protobufjs";

import { Cancelled, Internal, RegistryError, fromServiceError } from "./errors";
import { normalizeLangPair } from "./internal";
import { loadProto, type LoadedProto } from "./proto";
import { HeartbeatSession, type HeartbeatSessionOptions } from "./session";
import type {
  DeregisterNodeRequest,
  DeregisterNodeResponse,
  DrainNodeRequest,
  DrainNodeResponse,
  GetNodeRequest,
  GetNodeResponse,
  GetPoolRequest,
  GetPoolResponse,
  GetStatusRequest,
  GetStatusResponse,
  HeartbeatRequest,
  HeartbeatResponse,
  ListNodesRequest,
  ListNodesResponse,
  ListPoolsRequest,
  ListPoolsResponse,
  NodeFilter,
  NodeInit,
  PoolInit,
  PutPoolRequest,
  PutPoolResponse,
  RegisterNodeRequest,
  RegisterNodeResponse,
  ReleaseSlotRequest,
  ReleaseSlotResponse,
  ReserveSlotRequest,
  ReserveSlotResponse,
  ScheduleRequest,
  ScheduleResponse,
  SelectNodesRequest,
  SelectNodesResponse,
  Selector,
  WatchEvent,
  WatchRequest,
  WithRequired,
} from "./types";
import { Watcher, type WatcherOptions } from "./watch";

/** Matches the sidecar's default `--max-message-bytes`; a bigger request would be refused. */
export const DEFAULT_MAX_SEND_BYTES = 4 * 1024 * 1024;
/** ListNodes over a large fleet can exceed gRPC's 4 MiB default; the sidecar is trusted. */
export const DEFAULT_MAX_RECEIVE_BYTES = 64 * 1024 * 1024;
/** Deadline of every unary call unless the client or the call says otherwise. */
export const DEFAULT_TIMEOUT_MS = 5_000;

/**
 * Channel options for a sidecar on loopback (the same choices as the Python client).
 *
 * Reconnect backoff is capped at 2 s (gRPC's default is 120 s): a restarted sidecar on the
 * same host is back within a second, and heartbeats must resume before the node's TTL
 * runs out. Keepalive pings only while calls are open, at most every 30 s, so a server
 * with gRPC's default ping policy never answers GOAWAY "too_many_pings"; they detect a
 * half-open connection under a long-lived stream. No transparent retries: the session
 * and the watcher decide when to retry.
 */
export function defaultChannelOptions(): grpc.ChannelOptions {
  return {
    "grpc.max_send_message_length": DEFAULT_MAX_SEND_BYTES,
    "grpc.max_receive_message_length": DEFAULT_MAX_RECEIVE_BYTES,
    "grpc.keepalive_time_ms": 30_000,
    "grpc.keepalive_timeout_ms": 10_000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 2_000,
    "grpc.enable_retries": 0,
  };
}

export interface RegistryClientOptions {
  /** Default: insecure (the sidecar listens on loopback). */
  credentials?: grpc.ChannelCredentials;
  /** Deadline of every unary call in ms; `null` for none. Default 5000. Streams get none. */
  timeoutMs?: number | null;
  /** Sent with every call, e.g. an authorization token. */
  metadata?: grpc.Metadata | Record<string, string>;
  /** Merged over `defaultChannelOptions()`. */
  channelOptions?: grpc.ChannelOptions;
  /** Path of registry.proto; see `proto.ts` for how it is found by default. */
  protoPath?: string;
}

/** Per-call options; every unary method accepts them. */
export interface CallOptions {
  /** This call's deadline in ms from now (overrides the client's `timeoutMs`). */
  timeoutMs?: number | null;
  /** An absolute deadline; wins over `timeoutMs`. */
  deadline?: Date | number;
  /** Added to the client's metadata for this call. */
  metadata?: grpc.Metadata | Record<string, string>;
  /** Cancels the call; it then rejects with `Cancelled`. */
  signal?: AbortSignal;
}

export type HealthStatus = "UNKNOWN" | "SERVING" | "NOT_SERVING" | "SERVICE_UNKNOWN";

function toMetadata(value: grpc.Metadata | Record<string, string> | undefined): grpc.Metadata {
  if (value instanceof grpc.Metadata) return value.clone();
  const metadata = new grpc.Metadata();
  for (const [key, v] of Object.entries(value ?? {})) metadata.set(key, v);
  return metadata;
}

/** The selector message shared by SelectNodes and Schedule, built from optional filters. */
export function selectRequest(selector: Selector = {}): SelectNodesRequest {
  return {
    poolId: selector.poolId ?? "",
    langPair: normalizeLangPair(selector.langPair),
    requiredServices: [...(selector.requiredServices ?? [])],
    labels: { ...(selector.labels ?? {}) },
    count: selector.count ?? 0,
    excludeNodeIds: [...(selector.excludeNodeIds ?? [])],
    minHealth: selector.minHealth ?? 0,
  };
}

/**
 * Client of one sidecar.
 *
 * `new RegistryClient("127.0.0.1:50051")` owns its channel; call `close()` when done.
 * Every unary call gets a deadline (`timeoutMs`, default 5 s; per call via `CallOptions`);
 * it reaches the sidecar, which stops working on an expired call. Streams never get one.
 */
export class RegistryClient {
  readonly target: string;
  /** Default deadline of unary calls in ms (null: none). */
  timeoutMs: number | null;
  /** The grpc-js client underneath, e.g. for `getChannel()` or `waitForReady()`. */
  readonly grpcClient: grpc.Client;
  readonly proto: LoadedProto;
  private readonly metadata: grpc.Metadata;
  private closed = false;

  constructor(target: string, options: RegistryClientOptions = {}) {
    this.target = target;
    this.timeoutMs = options.timeoutMs === undefined ? DEFAULT_TIMEOUT_MS : options.timeoutMs;
    this.metadata = toMetadata(options.metadata);
    this.proto = loadProto(options.protoPath);
    this.grpcClient = new grpc.Client(
      target,
      options.credentials ?? grpc.credentials.createInsecure(),
      { ...defaultChannelOptions(), ...(options.channelOptions ?? {}) },
    );
  }

  /** True once `close()` was called; sessions and watchers of a closed client stop. */
  get isClosed(): boolean {
    return this.closed;
  }

  /** Close the channel; open streams are cancelled. Safe to call twice. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.grpcClient.close();
  }

  /** Wait until the channel is connected (e.g. while a sidecar starts); rejects on timeout. */
  waitForReady(timeoutMs = 10_000): Promise<void> {
    return new Promise((resolve, reject) => {
      this.grpcClient.waitForReady(Date.now() + timeoutMs, (err) => {
        if (err) reject(new RegistryError(err.message, { code: grpc.status.UNAVAILABLE, cause: err }));
        else resolve();
      });
    });
  }

  // -- nodes -------------------------------------------------------------------------------

  /** Upsert `node` (idempotent); `ttlMs` 0 or omitted picks the sidecar's default TTL. */
  async registerNode(
    node: NodeInit,
    options: CallOptions & { ttlMs?: number } = {},
  ): Promise<WithRequired<RegisterNodeResponse, "node">> {
    const request: RegisterNodeRequest = { node, ttlMs: options.ttlMs ?? 0 };
    const response = await this.call<RegisterNodeRequest, RegisterNodeResponse>(
      "RegisterNode",
      request,
      options,
    );
    return required(response, "RegisterNode", "node");
  }

  /** Remove a node and free its slots; `existed` is false if it was already absent. */
  deregisterNode(nodeId: string, options: CallOptions = {}): Promise<DeregisterNodeResponse> {
    return this.call<DeregisterNodeRequest, DeregisterNodeResponse>(
      "DeregisterNode",
      { nodeId },
      options,
    );
  }

  /** Stop new reservations on a node while it stays visible. */
  async drainNode(
    nodeId: string,
    options: CallOptions = {},
  ): Promise<WithRequired<DrainNodeResponse, "node">> {
    const response = await this.call<DrainNodeRequest, DrainNodeResponse>(
      "DrainNode",
      { nodeId },
      options,
    );
    return required(response, "DrainNode", "node");
  }

  /** Read one node from the sidecar's replica; rejects with `NotFound` if absent. */
  async getNode(
    nodeId: string,
    options: CallOptions = {},
  ): Promise<WithRequired<GetNodeResponse, "node" | "freshness">> {
    const response = await this.call<GetNodeRequest, GetNodeResponse>(
      "GetNode",
      { nodeId },
      options,
    );
    return required(response, "GetNode", "node", "freshness");
  }

  /** Nodes matching every given filter; no filter lists the whole fleet. */
  async listNodes(
    filter: NodeFilter = {},
    options: CallOptions = {},
  ): Promise<WithRequired<ListNodesResponse, "freshness">> {
    const request: ListNodesRequest = {
      poolId: filter.poolId ?? "",
      langPair: normalizeLangPair(filter.langPair),
      status: filter.status ?? "NODE_STATUS_UNSPECIFIED",
      labels: { ...(filter.labels ?? {}) },
    };
    const response = await this.call<ListNodesRequest, ListNodesResponse>(
      "ListNodes",
      request,
      options,
    );
    return required(response, "ListNodes", "freshness");
  }

  /** Ranked candidates for a job, plus a breakdown of why the others were excluded. */
  async selectNodes(
    selector: Selector = {},
    options: CallOptions = {},
  ): Promise<WithRequired<SelectNodesResponse, "breakdown" | "freshness">> {
    const response = await this.call<SelectNodesRequest, SelectNodesResponse>(
      "SelectNodes",
      selectRequest(selector),
      options,
    );
    return required(response, "SelectNodes", "breakdown", "freshness");
  }

  // -- job slots ---------------------------------------------------------------------------

  /** Take a slot for `jobId` (idempotent: a repeat renews the lease, `created` false). */
  async reserveSlot(
    nodeId: string,
    jobId: string,
    options: CallOptions & { leaseMs?: number } = {},
  ): Promise<WithRequired<ReserveSlotResponse, "node">> {
    const request: ReserveSlotRequest = { nodeId, jobId, leaseMs: options.leaseMs ?? 0 };
    const response = await this.call<ReserveSlotRequest, ReserveSlotResponse>(
      "ReserveSlot",
      request,
      options,
    );
    return required(response, "ReserveSlot", "node");
  }

  /** Free the slot of `jobId` (idempotent: a repeat resolves with `released` false). */
  releaseSlot(
    nodeId: string,
    jobId: string,
    options: CallOptions = {},
  ): Promise<ReleaseSlotResponse> {
    return this.call<ReleaseSlotRequest, ReleaseSlotResponse>(
      "ReleaseSlot",
      { nodeId, jobId },
      options,
    );
  }

  /**
   * Select candidates and reserve a slot on the first that has one (idempotent by `jobId`).
   * Rejects with `ResourceExhausted` (its `breakdown` says why) when no node had a slot.
   */
  async schedule(
    jobId: string,
    selector: Selector = {},
    options: CallOptions & { leaseMs?: number } = {},
  ): Promise<WithRequired<ScheduleResponse, "node" | "breakdown">> {
    const request: ScheduleRequest = {
      selector: selectRequest(selector),
      jobId,
      leaseMs: options.leaseMs ?? 0,
    };
    const response = await this.call<ScheduleRequest, ScheduleResponse>(
      "Schedule",
      request,
      options,
    );
    return required(response, "Schedule", "node", "breakdown");
  }

  // -- pools -------------------------------------------------------------------------------

  /** Create or replace a pool's configuration. */
  async putPool(
    pool: PoolInit,
    options: CallOptions = {},
  ): Promise<WithRequired<PutPoolResponse, "pool">> {
    const response = await this.call<PutPoolRequest, PutPoolResponse>(
      "PutPool",
      { pool },
      options,
    );
    return required(response, "PutPool", "pool");
  }

  /** Read one pool's configuration; rejects with `NotFound` if absent. */
  async getPool(
    poolId: string,
    options: CallOptions = {},
  ): Promise<WithRequired<GetPoolResponse, "pool">> {
    const response = await this.call<GetPoolRequest, GetPoolResponse>(
      "GetPool",
      { poolId },
      options,
    );
    return required(response, "GetPool", "pool");
  }

  /** Every pool's configuration. */
  listPools(options: CallOptions = {}): Promise<ListPoolsResponse> {
    return this.call<ListPoolsRequest, ListPoolsResponse>("ListPools", {}, options);
  }

  // -- status ------------------------------------------------------------------------------

  /** The sidecar's mode, versions and replica figures. */
  getStatus(options: CallOptions = {}): Promise<GetStatusResponse> {
    return this.call<GetStatusRequest, GetStatusResponse>("GetStatus", {}, options);
  }

  /** `grpc.health.v1.Health/Check`; `service` "" is the whole server. */
  async checkHealth(service = "", options: CallOptions = {}): Promise<HealthStatus> {
    const response = await this.unary<{ service: string }, { status: number }>(
      "/grpc.health.v1.Health/Check",
      encodeHealthRequest,
      decodeHealthResponse,
      { service },
      options,
    );
    return HEALTH_STATUS[response.status] ?? "UNKNOWN";
  }

  // -- streams -----------------------------------------------------------------------------

  /**
   * Follow changes as an async iterator that survives sidecar restarts (resume tokens,
   * backoff); see `Watcher`. `for await (const event of client.watch({ poolId })) ...`
   */
  watch(options: WatcherOptions = {}): Watcher {
    return new Watcher(this, options);
  }

  /**
   * A HeartbeatSession for `node` (not started): `await session.start()` registers the node
   * and starts heartbeating in the background; `await session.close()` stops it.
   */
  heartbeatSession(node: NodeInit, options: HeartbeatSessionOptions = {}): HeartbeatSession {
    return new HeartbeatSession(this, node, options);
  }

  /** One raw Watch stream (no reconnects); prefer `watch()`. */
  watchStream(
    request: Partial<WatchRequest> = {},
    options: Omit<CallOptions, "timeoutMs"> = {},
  ): grpc.ClientReadableStream<WatchEvent> {
    const method = this.method<WatchRequest, WatchEvent>("Watch");
    const full: WatchRequest = {
      resumeToken: request.resumeToken ?? "",
      poolId: request.poolId ?? "",
    };
    return this.grpcClient.makeServerStreamRequest<WatchRequest, WatchEvent>(
      method.path,
      method.requestSerialize,
      method.responseDeserialize,
      full,
      this.callMetadata(options.metadata),
      this.streamOptions(options),
    );
  }

  /** One raw Heartbeat stream (no reconnects); prefer `heartbeatSession()`. */
  heartbeatStream(
    options: Omit<CallOptions, "timeoutMs"> = {},
  ): grpc.ClientDuplexStream<HeartbeatRequest, HeartbeatResponse> {
    const method = this.method<HeartbeatRequest, HeartbeatResponse>("Heartbeat");
    return this.grpcClient.makeBidiStreamRequest<HeartbeatRequest, HeartbeatResponse>(
      method.path,
      method.requestSerialize,
      method.responseDeserialize,
      this.callMetadata(options.metadata),
      this.streamOptions(options),
    );
  }

  /** Map anything a call failed with to a `RegistryError` (with the breakdown decoded). */
  mapError(err: unknown): RegistryError {
    return fromServiceError(err, (bin) => this.proto.decodeBreakdown(bin));
  }

  // -- plumbing ----------------------------------------------------------------------------

  /** The method's path and (de)serializers; the types are the ones `types.ts` declares. */
  private method<Req, Res>(name: string): grpc.MethodDefinition<Req, Res> {
    const method = this.proto.service[name];
    if (!method) throw new Error(`RPC ${name} is not in ${this.proto.protoPath}`);
    return method as grpc.MethodDefinition<Req, Res>;
  }

  private call<Req, Res>(name: string, request: Req, options: CallOptions): Promise<Res> {
    const method = this.method<Req, Res>(name);
    return this.unary<Req, Res>(
      method.path,
      method.requestSerialize,
      method.responseDeserialize,
      request,
      options,
    );
  }

  private unary<Req, Res>(
    path: string,
    serialize: (value: Req) => Buffer,
    deserialize: (value: Buffer) => Res,
    request: Req,
    options: CallOptions,
  ): Promise<Res> {
    const { signal } = options;
    if (signal?.aborted) {
      return Promise.reject(new Cancelled("aborted before the call started", { cause: signal.reason }));
    }
    return new Promise<Res>((resolve, reject) => {
      let call: grpc.ClientUnaryCall;
      const onAbort = (): void => call.cancel();
      try {
        call = this.grpcClient.makeUnaryRequest<Req, Res>(
          path,
          serialize,
          deserialize,
          request,
          this.callMetadata(options.metadata),
          this.unaryOptions(options),
          (err, response) => {
            signal?.removeEventListener("abort", onAbort);
            if (err) reject(this.mapError(err));
            else if (response === undefined) reject(new Internal(`${path}: empty response`));
            else resolve(response);
          },
        );
      } catch (err) {
        // Serialization of a malformed request throws synchronously.
        reject(this.mapError(err));
        return;
      }
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  }

  private callMetadata(extra: CallOptions["metadata"]): grpc.Metadata {
    const metadata = this.metadata.clone();
    if (extra !== undefined) metadata.merge(toMetadata(extra));
    return metadata;
  }

  private unaryOptions(options: CallOptions): grpc.CallOptions {
    if (options.deadline !== undefined) return { deadline: options.deadline };
    const timeoutMs = options.timeoutMs === undefined ? this.timeoutMs : options.timeoutMs;
    return timeoutMs == null ? {} : { deadline: Date.now() + timeoutMs };
  }

  private streamOptions(options: Omit<CallOptions, "timeoutMs">): grpc.CallOptions {
    return options.deadline !== undefined ? { deadline: options.deadline } : {};
  }
}

/** Check the contract's always-set message fields, so the types can promise them. */
function required<T extends object, K extends keyof T>(
  response: T,
  rpc: string,
  ...keys: K[]
): WithRequired<T, K> {
  for (const key of keys) {
    if (response[key] == null) {
      throw new Internal(`${rpc} response lacks ${String(key)}`);
    }
  }
  return response as WithRequired<T, K>;
}

// grpc.health.v1: two one-field messages, declared inline rather than loading another proto.
const healthRoot = protobuf.Root.fromJSON({
  nested: {
    grpc_health_v1: {
      nested: {
        HealthCheckRequest: { fields: { service: { type: "string", id: 1 } } },
        HealthCheckResponse: { fields: { status: { type: "int32", id: 1 } } },
      },
    },
  },
});
const HealthCheckRequest = healthRoot.lookupType("grpc_health_v1.HealthCheckRequest");
const HealthCheckResponse = healthRoot.lookupType("grpc_health_v1.HealthCheckResponse");

const HEALTH_STATUS: Record<number, HealthStatus> = {
  0: "UNKNOWN",
  1: "SERVING",
  2: "NOT_SERVING",
  3: "SERVICE_UNKNOWN",
};

function encodeHealthRequest(request: { service: string }): Buffer {
  return Buffer.from(HealthCheckRequest.encode(HealthCheckRequest.fromObject(request)).finish());
}

function decodeHealthResponse(buffer: Buffer): { status: number } {
  const message = HealthCheckResponse.decode(buffer);
  return HealthCheckResponse.toObject(message, { defaults: true }) as { status: number };
}
