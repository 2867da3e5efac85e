/**
 * Watcher: a Watch stream that survives sidecar restarts without losing or repeating events.
 *
 * The same semantics as the Python client's `Watcher`:
 *
 * - The first stream starts from `resumeToken`; an empty token (the default) makes the
 *   sidecar send a snapshot: zero or more SNAPSHOT events, then SNAPSHOT_END. Live events
 *   (PUT, DELETE, BOOKMARK) follow.
 * - The watcher remembers the token of every event that carries one (bookmarks included).
 *   When the stream breaks it reopens it with that token after an exponential, jittered
 *   backoff, so the caller sees one continuous sequence: nothing repeated, nothing missed.
 * - If the sidecar cannot resume from the token (too old, trimmed log, Redis lost its
 *   data), it sends a new snapshot; the watcher passes it through, and the caller must
 *   rebuild its state from it instead of patching.
 * - Tokens seen inside a snapshot are only adopted at SNAPSHOT_END: a stream that breaks
 *   mid-snapshot is resumed from before the snapshot, so a complete one is sent again.
 * - `snapshots` counts snapshots begun: when it changes, clear the scratch state built from
 *   SNAPSHOT events and swap it in at SNAPSHOT_END.
 */

import type { ClientReadableStream } from "@grpc/grpc-js";

import type { RegistryClient } from "./client";
import { RegistryError, STREAM_RETRYABLE_CODES, StreamBroken } from "./errors";
import { type BackoffOptions, END, Sleeper, StreamReader, backoffDelayMs } from "./internal";
import { type WatchEvent, WatchEventType } from "./types";

export interface WatcherOptions {
  /** Only events about nodes of this pool (empty: every node). */
  poolId?: string;
  /** Resume after this token (e.g. persisted from `resumeToken`); empty starts with a snapshot. */
  resumeToken?: string;
  /**
   * How many times in a row the stream may be reopened without an event in between
   * (undefined: never give up); past it the last error is thrown from the iteration.
   */
  maxReconnects?: number;
  /** Reconnect backoff; defaults: 100 ms initial, 5 s max, 500 ms jitter. */
  backoff?: BackoffOptions;
  /** Events queued before the stream is paused (flow control). Default 256. */
  highWaterMark?: number;
}

/**
 * Async iterator over the WatchEvents of one pool:
 * `for await (const event of client.watch({ poolId: "p" })) { ... }`.
 *
 * Errors retrying cannot fix (e.g. `InvalidArgument` for a bad pool id) are thrown at
 * once. Iteration ends after `close()`, which may be called from anywhere (breaking out of
 * `for await` calls it too).
 */
export class Watcher implements AsyncIterableIterator<WatchEvent> {
  readonly poolId: string;
  /** Where a new stream would resume; persist it to resume after a process restart. */
  resumeToken: string;
  readonly maxReconnects: number | undefined;
  /** Streams opened to replace a broken one, over the watcher's whole life. */
  reconnects = 0;
  /** Snapshots begun. */
  snapshots = 0;
  /** Version of the last event that carried one. */
  lastVersion = 0;

  private readonly client: RegistryClient;
  private readonly backoff: BackoffOptions;
  private readonly highWaterMark: number;
  private call: ClientReadableStream<WatchEvent> | null = null;
  private reader: StreamReader<WatchEvent> | null = null;
  private streams = 0;
  private inSnapshot = false;
  private snapshotToken = "";
  private closed = false;
  private readonly sleeper = new Sleeper();

  constructor(client: RegistryClient, options: WatcherOptions = {}) {
    if (options.maxReconnects !== undefined && !(options.maxReconnects >= 0)) {
      throw new RangeError("maxReconnects must be undefined or >= 0");
    }
    this.client = client;
    this.poolId = options.poolId ?? "";
    this.resumeToken = options.resumeToken ?? "";
    this.maxReconnects = options.maxReconnects;
    this.backoff = options.backoff ?? {};
    this.highWaterMark = options.highWaterMark ?? 256;
  }

  /** True while a stream is open (it may still be waiting for its first event). */
  get connected(): boolean {
    return this.call !== null;
  }

  [Symbol.asyncIterator](): this {
    return this;
  }

  async next(): Promise<IteratorResult<WatchEvent, undefined>> {
    let failures = 0;
    for (;;) {
      if (this.closed) return { done: true, value: undefined };
      try {
        const event = await this.nextEvent();
        if (event === null) return { done: true, value: undefined };
        return { done: false, value: event };
      } catch (err) {
        this.dropCall();
        if (this.closed) return { done: true, value: undefined };
        const error: RegistryError = this.client.mapError(err);
        if (!STREAM_RETRYABLE_CODES.has(error.code) || this.client.isClosed) throw error;
        if (this.maxReconnects !== undefined && failures >= this.maxReconnects) throw error;
        failures += 1;
        await this.sleeper.sleep(backoffDelayMs(failures, this.backoff));
      }
    }
  }

  /** Called when a `for await` loop exits early: closes the watcher. */
  async return(): Promise<IteratorResult<WatchEvent, undefined>> {
    this.close();
    return { done: true, value: undefined };
  }

  /** Cancel the stream and end the iteration. Idempotent. */
  close(): void {
    this.closed = true;
    this.sleeper.wake();
    this.dropCall();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.close();
  }

  /** The next event of the current stream, opening one if needed; null once closed. */
  private async nextEvent(): Promise<WatchEvent | null> {
    const reader = this.reader ?? this.open();
    const message = await reader.next();
    if (message === END) {
      this.dropCall();
      if (this.closed) return null;
      throw new StreamBroken("the sidecar ended the watch stream");
    }
    this.track(message);
    return message;
  }

  private open(): StreamReader<WatchEvent> {
    this.streams += 1;
    if (this.streams > 1) this.reconnects += 1;
    this.inSnapshot = false;
    const call = this.client.watchStream({ resumeToken: this.resumeToken, poolId: this.poolId });
    this.call = call;
    this.reader = new StreamReader<WatchEvent>(call, this.highWaterMark);
    return this.reader;
  }

  private dropCall(): void {
    this.call?.cancel();
    this.call = null;
    this.reader = null;
  }

  /** Keep the resume position; see the module comment for the snapshot rule. */
  private track(event: WatchEvent): void {
    if (event.version) this.lastVersion = event.version;
    if (event.type === WatchEventType.SNAPSHOT) {
      if (!this.inSnapshot) {
        this.inSnapshot = true;
        this.snapshotToken = "";
        this.snapshots += 1;
      }
      if (event.resumeToken) this.snapshotToken = event.resumeToken;
    } else if (event.type === WatchEventType.SNAPSHOT_END) {
      if (!this.inSnapshot) {
        this.snapshots += 1; // an empty snapshot is just its end marker
        this.snapshotToken = "";
      }
      this.inSnapshot = false;
      const token = event.resumeToken || this.snapshotToken;
      if (token) this.resumeToken = token;
    } else if (event.resumeToken && !this.inSnapshot) {
      this.resumeToken = event.resumeToken;
    }
  }
}
