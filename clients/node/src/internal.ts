/** Small helpers shared by the session and the watcher: backoff, wake-able sleep, stream reads. */

import type { Readable } from "node:stream";

/** Exponential backoff with additive jitter, as tenacity's `wait_exponential_jitter`. */
export interface BackoffOptions {
  /** Wait before the first retry, before jitter (ms). Default 100. */
  initialMs?: number;
  /** Longest wait (ms). Default 5000. */
  maxMs?: number;
  /** Up to this much random time is added to each wait (ms). Default 500. */
  jitterMs?: number;
}

/** Wait before retry number `attempt` (1-based): min(max, initial * 2^(attempt-1) + U(0, jitter)). */
export function backoffDelayMs(
  attempt: number,
  { initialMs = 100, maxMs = 5_000, jitterMs = 500 }: BackoffOptions = {},
  random: () => number = Math.random,
): number {
  const exp = initialMs * 2 ** Math.max(0, attempt - 1);
  return Math.max(0, Math.min(maxMs, exp + random() * jitterMs));
}

/** A sleep that ends early when `wake()` is called (used to make close() prompt). */
export class Sleeper {
  private wakers = new Set<() => void>();
  private woken = false;

  /** Resolves after `ms`, or at once once `wake()` was called. */
  sleep(ms: number): Promise<void> {
    if (this.woken) return Promise.resolve();
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.wakers.delete(done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.wakers.add(done);
    });
  }

  /** End every current and future sleep at once. */
  wake(): void {
    this.woken = true;
    for (const done of [...this.wakers]) done();
  }
}

/** Returned by `StreamReader.next()` when the stream ended without an error. */
export const END: unique symbol = Symbol("end of stream");

export class ReadTimeout extends Error {
  constructor(readonly timeoutMs: number) {
    super(`no message within ${timeoutMs} ms`);
    this.name = "ReadTimeout";
  }
}

/**
 * Pull-style reads from a grpc-js response stream, one message at a time.
 *
 * Messages are queued as they arrive; past `highWater` queued messages the stream is
 * paused, so a slow consumer applies HTTP/2 flow control instead of growing memory.
 * An error (the call's status) is raised only after the queued messages were read.
 * Listeners stay attached for the stream's whole life, so a late `error` event (e.g.
 * CANCELLED after `cancel()`) never goes unhandled.
 */
export class StreamReader<T> {
  private readonly queue: T[] = [];
  private ended = false;
  private error: unknown = undefined;
  private wake: (() => void) | null = null;

  constructor(
    private readonly stream: Readable,
    private readonly highWater = 256,
  ) {
    stream.on("data", (message: T) => {
      this.queue.push(message);
      if (this.queue.length >= this.highWater) stream.pause();
      this.notify();
    });
    stream.on("error", (err: unknown) => {
      if (this.error === undefined) this.error = err;
      this.ended = true;
      this.notify();
    });
    stream.on("end", () => {
      this.ended = true;
      this.notify();
    });
  }

  /** The next message, `END` after a clean end; throws the stream's error or `ReadTimeout`. */
  async next(timeoutMs?: number): Promise<T | typeof END> {
    const deadline = timeoutMs === undefined ? undefined : Date.now() + timeoutMs;
    for (;;) {
      if (this.queue.length > 0) {
        const message = this.queue.shift() as T;
        if (this.stream.isPaused() && this.queue.length <= this.highWater / 2) {
          this.stream.resume();
        }
        return message;
      }
      if (this.error !== undefined) throw this.error;
      if (this.ended) return END;
      const left = deadline === undefined ? undefined : deadline - Date.now();
      if (left !== undefined && left <= 0) throw new ReadTimeout(timeoutMs as number);
      await new Promise<void>((resolve) => {
        const timer = left === undefined ? undefined : setTimeout(resolve, left);
        this.wake = () => {
          if (timer !== undefined) clearTimeout(timer);
          resolve();
        };
      });
      this.wake = null;
    }
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = null;
    wake?.();
  }
}

export function normalizeLangPair(
  value: { src: string; tgt: string } | readonly [string, string] | null | undefined,
): { src: string; tgt: string } | null {
  if (value == null) return null;
  if (Array.isArray(value)) {
    const [src, tgt] = value as readonly [string, string];
    return { src, tgt };
  }
  const { src, tgt } = value as { src: string; tgt: string };
  return { src, tgt };
}
