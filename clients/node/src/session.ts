/**
 * HeartbeatSession: keeps one node registered and heartbeating, across sidecar restarts.
 *
 * The node-side counterpart of an etcd lease keepalive, and the twin of the Python
 * client's `HeartbeatSession`. One background loop owns one Heartbeat stream: it writes a
 * request, waits for the response with the same `seq`, sleeps for the interval and
 * repeats. Whatever breaks the stream (sidecar restart, network error, missing or
 * mismatched ack) makes it reopen the stream with exponential backoff and jitter, and
 * whenever the registry answers `HEARTBEAT_ACTION_REGISTER` (the node expired, was
 * deregistered, or Redis lost it) the session registers the node again and goes on.
 */

import { EventEmitter } from "node:events";

import type { ClientDuplexStream } from "@grpc/grpc-js";

import type { RegistryClient } from "./client";
import { RegistryError, STREAM_RETRYABLE_CODES, StreamBroken } from "./errors";
import {
  type BackoffOptions,
  END,
  ReadTimeout,
  Sleeper,
  StreamReader,
  backoffDelayMs,
} from "./internal";
import {
  HeartbeatAction,
  type HeartbeatRequest,
  type HeartbeatResponse,
  type MetricsInit,
  type Node,
  type NodeInit,
} from "./types";

/** Called before every heartbeat; null/undefined sends no metrics (the registry keeps the last). */
export type MetricsProvider = () => MetricsInit | null | undefined;
/** Called before every heartbeat; the ids of the jobs the node runs right now. */
export type JobsProvider = () => Iterable<string>;

/** Where the session reports what it does; `console` works. */
export interface Logger {
  debug?(message: string): void;
  info?(message: string): void;
  warn(message: string): void;
  error(message: string): void;
}

/** Default logger: warnings and errors to stderr, nothing else. */
export const stderrLogger: Logger = {
  warn: (message) => console.warn(message),
  error: (message) => console.error(message),
};

/** A logger that drops everything. */
export const silentLogger: Logger = { warn: () => {}, error: () => {} };

export interface HeartbeatSessionOptions {
  /** Liveness TTL asked for at registration; 0 or omitted picks the sidecar's default. */
  ttlMs?: number;
  /**
   * Fixed interval between heartbeats. Omitted: the interval the sidecar suggests in each
   * response (a third of the TTL), and before the first response ttlMs / 3 (1 s if no ttlMs).
   */
  intervalMs?: number;
  metricsProvider?: MetricsProvider;
  jobsProvider?: JobsProvider;
  /** Deregister the node when the session is closed. Default false. */
  deregisterOnClose?: boolean;
  /** Reconnect backoff; defaults: 100 ms initial, 5 s max, 500 ms jitter. */
  backoff?: BackoffOptions;
  /** How long to wait for an ack; default max(1 s, 2 x interval). */
  ackTimeoutMs?: number;
  /** How long close() lets the stream end cleanly before cancelling it. Default 2000. */
  closeTimeoutMs?: number;
  /** Default `stderrLogger`; pass `silentLogger` or null for none. */
  logger?: Logger | null;
}

/** Events a session emits (it is an EventEmitter; none of them is "error"). */
export interface HeartbeatSessionEvents {
  /** Every acknowledged heartbeat. */
  ack: [response: HeartbeatResponse];
  /** The node was registered again because the registry answered REGISTER. */
  reregistered: [node: Node];
  /** A stream replaced a broken one and got its first ack. */
  reconnected: [];
  /** The stream broke; a new one is opened after `delayMs`. */
  disconnected: [error: RegistryError, delayMs: number];
  /** The session stopped: after close() (error null) or by a non-retryable error. */
  stopped: [error: RegistryError | null];
}

const FALLBACK_INTERVAL_MS = 1_000;

export interface HeartbeatSession {
  on<K extends keyof HeartbeatSessionEvents>(
    event: K,
    listener: (...args: HeartbeatSessionEvents[K]) => void,
  ): this;
  once<K extends keyof HeartbeatSessionEvents>(
    event: K,
    listener: (...args: HeartbeatSessionEvents[K]) => void,
  ): this;
  off<K extends keyof HeartbeatSessionEvents>(
    event: K,
    listener: (...args: HeartbeatSessionEvents[K]) => void,
  ): this;
  emit<K extends keyof HeartbeatSessionEvents>(
    event: K,
    ...args: HeartbeatSessionEvents[K]
  ): boolean;
}

/**
 * Registers a node, then heartbeats it in the background until closed.
 *
 * `start()` registers once and rejects if that fails, so misconfiguration (a bad node id,
 * no sidecar) shows at startup; after that every failure is handled in the background,
 * counted and logged. A non-retryable failure (e.g. INVALID_ARGUMENT) stops the session
 * and is kept in `error` (and emitted as `stopped`).
 *
 * `seq` increases by one per request over the session's whole life, across streams.
 * `close()` half-closes the stream so the sidecar sees a clean end; with
 * `deregisterOnClose` (or `close({ deregister: true })`) the node is removed afterwards.
 */
export class HeartbeatSession extends EventEmitter {
  /** The last acknowledgement received. */
  lastResponse: HeartbeatResponse | null = null;
  /** The node as the registry stored it at the last RegisterNode. */
  registered: Node | null = null;
  /** True while a stream is open and has acknowledged at least one heartbeat. */
  connected = false;
  /** Heartbeats written. */
  sent = 0;
  /** Heartbeats acknowledged (any action). */
  acked = 0;
  /** Acks with action BUFFERED: the sidecar kept the heartbeat while Redis was away. */
  buffered = 0;
  /** RegisterNode calls made because the registry answered HEARTBEAT_ACTION_REGISTER. */
  reregistrations = 0;
  /** Streams that replaced a broken one and got acknowledged. */
  reconnects = 0;
  /** Why the session stopped by itself, if it did. */
  error: RegistryError | null = null;

  private readonly client: RegistryClient;
  private readonly node: NodeInit;
  private readonly ttlMs: number;
  private readonly fixedIntervalMs: number | undefined;
  private readonly metricsProvider: MetricsProvider | undefined;
  private readonly jobsProvider: JobsProvider | undefined;
  private readonly deregisterOnClose: boolean;
  private readonly backoff: BackoffOptions;
  private readonly ackTimeoutMs: number | undefined;
  private readonly closeTimeoutMs: number;
  private readonly log: Logger;

  private seq = 0;
  private streams = 0;
  private intervalMs: number;
  private loop: Promise<void> | null = null;
  private call: ClientDuplexStream<HeartbeatRequest, HeartbeatResponse> | null = null;
  private closing = false;
  private closed = false;
  private stopped = false;
  private readonly sleeper = new Sleeper();
  private readonly progress = new Set<() => void>();

  constructor(client: RegistryClient, node: NodeInit, options: HeartbeatSessionOptions = {}) {
    super();
    if (!node.nodeId) throw new TypeError("node.nodeId is required");
    if (options.intervalMs !== undefined && !(options.intervalMs > 0)) {
      throw new RangeError("intervalMs must be positive");
    }
    this.client = client;
    this.node = structuredClone(node);
    this.ttlMs = options.ttlMs ?? 0;
    this.fixedIntervalMs = options.intervalMs;
    this.metricsProvider = options.metricsProvider;
    this.jobsProvider = options.jobsProvider;
    this.deregisterOnClose = options.deregisterOnClose ?? false;
    this.backoff = options.backoff ?? {};
    this.ackTimeoutMs = options.ackTimeoutMs;
    this.closeTimeoutMs = options.closeTimeoutMs ?? 2_000;
    this.log = options.logger === null ? silentLogger : (options.logger ?? stderrLogger);
    this.intervalMs = this.fallbackIntervalMs();
  }

  get nodeId(): string {
    return this.node.nodeId;
  }

  /** True while the background loop is alive (started, not closed, not failed). */
  get running(): boolean {
    return this.loop !== null && !this.stopped;
  }

  /** The interval the session currently sleeps between heartbeats (ms). */
  get currentIntervalMs(): number {
    return this.intervalMs;
  }

  // -- lifecycle ---------------------------------------------------------------------------

  /** Register the node (rejecting on failure), then start heartbeating in the background. */
  async start(): Promise<this> {
    if (this.loop !== null || this.closed) {
      throw new Error("a HeartbeatSession can be started once");
    }
    const registering = this.register();
    // Until the loop runs, close() waits for the registration (so it can deregister after it).
    this.loop = registering.then(
      () => undefined,
      () => undefined,
    );
    try {
      await registering;
    } catch (err) {
      this.stopped = true;
      throw err;
    }
    if (this.closing) {
      this.stopped = true; // closed while registering
      return this;
    }
    this.loop = this.run();
    return this;
  }

  /**
   * Stop heartbeating, half-close the stream, and deregister if asked. Idempotent.
   *
   * The stream gets `closeTimeoutMs` to end cleanly and is cancelled after that; the
   * background loop is over when this resolves. Deregistration failures are logged, not
   * thrown.
   */
  async close(options: { deregister?: boolean } = {}): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.closing = true;
    this.sleeper.wake();
    const loop = this.loop;
    if (loop !== null) {
      let timer: NodeJS.Timeout | undefined;
      const timedOut = await Promise.race([
        loop.then(() => false),
        new Promise<boolean>((resolve) => {
          timer = setTimeout(() => resolve(true), this.closeTimeoutMs);
        }),
      ]);
      clearTimeout(timer);
      if (timedOut) {
        this.log.warn(`heartbeat session ${this.nodeId} did not stop in time; cancelling`);
        this.call?.cancel();
        await loop;
      }
    }
    const deregister = options.deregister ?? this.deregisterOnClose;
    if (deregister && loop !== null) {
      try {
        await this.client.deregisterNode(this.nodeId);
      } catch (err) {
        this.log.warn(`deregistering ${this.nodeId} on close failed: ${String(err)}`);
      }
    }
  }

  /** `await using session = ...` closes the session at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /**
   * Resolve once `predicate(this)` holds; checked after every ack and when the session
   * stops. Rejects with the session's `error` if it stopped first, or after `timeoutMs`.
   * Meant for tests and startup checks, not for hot paths.
   */
  waitFor(predicate: (session: this) => boolean, timeoutMs?: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const check = (): void => {
        if (predicate(this)) finish();
        else if (this.stopped) {
          finish(
            this.error ?? new Error(`heartbeat session ${this.nodeId} stopped after ${this.acked} acks`),
          );
        }
      };
      const finish = (err?: Error): void => {
        clearTimeout(timer);
        this.progress.delete(check);
        if (err) reject(err);
        else resolve();
      };
      if (timeoutMs !== undefined) {
        timer = setTimeout(
          () => finish(new Error(`heartbeat session ${this.nodeId}: condition not met within ${timeoutMs} ms`)),
          timeoutMs,
        );
      }
      this.progress.add(check);
      check();
    });
  }

  /** Resolve once `n` heartbeats in total have been acknowledged (see `waitFor`). */
  waitAcked(n: number, timeoutMs?: number): Promise<void> {
    return this.waitFor((s) => s.acked >= n, timeoutMs);
  }

  // -- background loop ---------------------------------------------------------------------

  private async run(): Promise<void> {
    let failures = 0;
    try {
      while (!this.closing) {
        try {
          await this.stream(() => {
            failures = 0; // backoff counts failures since the last healthy stream
          });
        } catch (err) {
          const error = this.client.mapError(err);
          if (this.closing) break;
          if (!STREAM_RETRYABLE_CODES.has(error.code) || this.client.isClosed) {
            this.error = error;
            this.log.error(`heartbeat session ${this.nodeId} stopped: ${error.message}`);
            break;
          }
          failures += 1;
          const delayMs = backoffDelayMs(failures, this.backoff);
          this.log.warn(
            `heartbeat stream for ${this.nodeId} broke (${error.message}); ` +
              `reconnecting in ${(delayMs / 1000).toFixed(2)}s`,
          );
          this.safeEmit("disconnected", error, delayMs);
          await this.sleeper.sleep(delayMs);
        }
      }
    } finally {
      this.connected = false;
      this.stopped = true;
      this.notify();
      this.safeEmit("stopped", this.error);
    }
  }

  /** Run one Heartbeat stream until closing (resolves) or until it breaks (rejects). */
  private async stream(onHealthy: () => void): Promise<void> {
    if (this.closing) return;
    const call = this.client.heartbeatStream();
    const reader = new StreamReader<HeartbeatResponse>(call);
    this.call = call;
    this.streams += 1;
    let ackedHere = false;
    try {
      while (!this.closing) {
        const request = this.nextRequest();
        write(call, request);
        this.sent += 1;
        const response = await this.readAck(reader);
        if (response.seq !== request.seq) {
          throw new StreamBroken(`ack carries seq ${response.seq}, expected ${request.seq}`);
        }
        if (!ackedHere) {
          ackedHere = true;
          onHealthy();
          this.connected = true;
          if (this.streams > 1) {
            this.reconnects += 1;
            this.log.info?.(`heartbeat stream for ${this.nodeId} re-established`);
            this.safeEmit("reconnected");
          }
        }
        this.lastResponse = response;
        this.acked += 1;
        if (response.action === HeartbeatAction.BUFFERED) this.buffered += 1;
        if (response.action === HeartbeatAction.REGISTER) {
          this.log.info?.(`registry asked ${this.nodeId} to register again`);
          const node = await this.register();
          this.reregistrations += 1;
          this.safeEmit("reregistered", node);
        }
        this.safeEmit("ack", response);
        this.notify();
        this.intervalMs = this.nextIntervalMs(response);
        await this.sleeper.sleep(this.intervalMs);
      }
      await this.halfClose(call, reader);
    } finally {
      this.connected = false;
      this.call = null;
      call.cancel(); // no-op once the call has ended
    }
  }

  private async readAck(reader: StreamReader<HeartbeatResponse>): Promise<HeartbeatResponse> {
    const timeoutMs = this.ackTimeoutMs ?? Math.max(1_000, 2 * this.intervalMs);
    let message: HeartbeatResponse | typeof END;
    try {
      message = await reader.next(timeoutMs);
    } catch (err) {
      if (err instanceof ReadTimeout) {
        throw new StreamBroken(`no heartbeat ack within ${(timeoutMs / 1000).toFixed(1)}s`);
      }
      throw err;
    }
    if (message === END) throw new StreamBroken("the sidecar ended the heartbeat stream");
    return message;
  }

  /** Tell the sidecar we are done and let it end the call, so neither side sees an error. */
  private async halfClose(
    call: ClientDuplexStream<HeartbeatRequest, HeartbeatResponse>,
    reader: StreamReader<HeartbeatResponse>,
  ): Promise<void> {
    try {
      call.end();
      const deadline = Date.now() + this.closeTimeoutMs / 2;
      for (;;) {
        const left = deadline - Date.now();
        if (left <= 0) return;
        if ((await reader.next(left)) === END) return;
      }
    } catch {
      // A stream that fails while closing is closed all the same.
    }
  }

  private async register(): Promise<Node> {
    const response = await this.client.registerNode(this.node, { ttlMs: this.ttlMs });
    this.registered = response.node;
    return response.node;
  }

  private nextRequest(): HeartbeatRequest {
    this.seq += 1;
    const request: HeartbeatRequest = {
      nodeId: this.nodeId,
      seq: this.seq,
      metrics: null,
      runningJobIds: [],
      reportJobs: false,
    };
    if (this.metricsProvider) {
      try {
        request.metrics = this.metricsProvider() ?? null;
      } catch (err) {
        this.log.warn(`metrics provider of ${this.nodeId} failed (${String(err)}); heartbeat without metrics`);
      }
    }
    if (this.jobsProvider) {
      try {
        request.runningJobIds = [...this.jobsProvider()];
        request.reportJobs = true;
      } catch (err) {
        // Reporting nothing is safe; reporting a wrong empty list would free live slots.
        this.log.warn(`jobs provider of ${this.nodeId} failed (${String(err)}); heartbeat without jobs`);
      }
    }
    return request;
  }

  private fallbackIntervalMs(): number {
    return this.ttlMs > 0 ? Math.floor(this.ttlMs / 3) : FALLBACK_INTERVAL_MS;
  }

  private nextIntervalMs(response: HeartbeatResponse): number {
    if (this.fixedIntervalMs !== undefined) return this.fixedIntervalMs;
    if (response.intervalMs > 0) return response.intervalMs;
    return this.fallbackIntervalMs();
  }

  /** Emit without letting a throwing listener break the heartbeat loop. */
  private safeEmit<K extends keyof HeartbeatSessionEvents>(
    event: K,
    ...args: HeartbeatSessionEvents[K]
  ): void {
    try {
      this.emit(event, ...args);
    } catch (err) {
      this.log.warn(`a "${event}" listener of heartbeat session ${this.nodeId} threw: ${String(err)}`);
    }
  }

  private notify(): void {
    for (const check of [...this.progress]) check();
  }
}

function write(
  call: ClientDuplexStream<HeartbeatRequest, HeartbeatResponse>,
  request: HeartbeatRequest,
): void {
  if (call.writableEnded || call.destroyed) {
    throw new StreamBroken("the heartbeat stream is closed");
  }
  try {
    call.write(request);
  } catch (err) {
    throw new StreamBroken(`writing a heartbeat failed: ${String(err)}`);
  }
}
