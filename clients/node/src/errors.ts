/**
 * One error root for the client and one table from gRPC status codes to its subclasses.
 *
 * Callers catch `NotFound` or `Unavailable` (`instanceof`) instead of inspecting grpc-js
 * `ServiceError` codes. Every error carries the numeric gRPC `code`, the server's
 * `details`, the trailing `metadata`, and the original error as `cause`.
 */

import { Metadata, status as Status } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";

import type { SelectionBreakdown } from "./types";

export { Status };

export interface RegistryErrorOptions {
  code?: Status;
  metadata?: Metadata;
  cause?: unknown;
}

/** Root of every error the client raises for a failed RPC. */
export class RegistryError extends Error {
  /** The status code instances of this class carry unless told otherwise. */
  static readonly grpcCode: Status = Status.UNKNOWN;

  /** gRPC status code (`Status.NOT_FOUND`, ...). */
  readonly code: Status;
  /** The server's message; for INVALID_ARGUMENT it starts with the field name. */
  readonly details: string;
  /** Trailing metadata of the failed call, when there was one. */
  readonly metadata: Metadata | undefined;

  constructor(details = "", options: RegistryErrorOptions = {}) {
    const code = options.code ?? (new.target as typeof RegistryError).grpcCode;
    const name = Status[code] ?? String(code);
    super(details ? `${name}: ${details}` : name, { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.details = details;
    this.metadata = options.metadata;
  }

  /** The status code's name, e.g. `"NOT_FOUND"`. */
  get codeName(): string {
    return Status[this.code] ?? String(this.code);
  }

  /** True when the same request may succeed later (every registry write is idempotent). */
  get retryable(): boolean {
    return RETRYABLE_CODES.has(this.code);
  }
}

/** Bad input; `field` names it. Retrying the same request cannot succeed. */
export class InvalidArgument extends RegistryError {
  static override readonly grpcCode = Status.INVALID_ARGUMENT;

  /** The field the server complained about, e.g. `node.pools[1]` (from `details`). */
  get field(): string {
    const at = this.details.indexOf(": ");
    return at > 0 ? this.details.slice(0, at) : "";
  }
}

/** The node, pool or reservation does not exist (in the sidecar's replica). */
export class NotFound extends RegistryError {
  static override readonly grpcCode = Status.NOT_FOUND;
}

/** The job already holds a slot on another node. */
export class AlreadyExists extends RegistryError {
  static override readonly grpcCode = Status.ALREADY_EXISTS;
}

/** The node is in the wrong state for the request, e.g. DRAINING or OFFLINE. */
export class FailedPrecondition extends RegistryError {
  static override readonly grpcCode = Status.FAILED_PRECONDITION;
}

/** No free slot, or a stream fell too far behind and was ended by the server. */
export class ResourceExhausted extends RegistryError {
  static override readonly grpcCode = Status.RESOURCE_EXHAUSTED;

  /** For a failed Schedule: why every node was excluded (sent as a status detail). */
  readonly breakdown: SelectionBreakdown | null;

  constructor(
    details = "",
    options: RegistryErrorOptions & { breakdown?: SelectionBreakdown | null } = {},
  ) {
    super(details, options);
    this.breakdown = options.breakdown ?? null;
  }
}

/** The sidecar (or the Redis behind it, for writes) cannot be reached; retryable. */
export class Unavailable extends RegistryError {
  static override readonly grpcCode = Status.UNAVAILABLE;
}

/**
 * A stream ended without an error status, or broke its protocol (no ack, wrong seq).
 * Sessions and watchers treat it like UNAVAILABLE and reopen the stream with backoff.
 */
export class StreamBroken extends Unavailable {}

/** A version conflict; re-read and retry. */
export class Aborted extends RegistryError {
  static override readonly grpcCode = Status.ABORTED;
}

/** The sidecar is older than this client and lacks the RPC. */
export class Unimplemented extends RegistryError {
  static override readonly grpcCode = Status.UNIMPLEMENTED;
}

/** The call's deadline ran out; a write may or may not have happened (all are idempotent). */
export class DeadlineExceeded extends RegistryError {
  static override readonly grpcCode = Status.DEADLINE_EXCEEDED;
}

/** The call was cancelled (by an AbortSignal, or by the server or transport). */
export class Cancelled extends RegistryError {
  static override readonly grpcCode = Status.CANCELLED;
}

/** A bug on the sidecar's side, or a response breaking the contract. */
export class Internal extends RegistryError {
  static override readonly grpcCode = Status.INTERNAL;
}

const BY_CODE = new Map<Status, typeof RegistryError>(
  [
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    Aborted,
    Unimplemented,
    DeadlineExceeded,
    Cancelled,
    Internal,
  ].map((cls) => [cls.grpcCode, cls]),
);

/** Codes after which a unary request may simply be sent again (every write is idempotent). */
export const RETRYABLE_CODES: ReadonlySet<Status> = new Set([
  Status.UNAVAILABLE,
  Status.DEADLINE_EXCEEDED,
  Status.ABORTED,
]);

/**
 * Codes after which a long-lived stream is reopened: a sidecar shutting down ends streams
 * UNAVAILABLE or CANCELLED, a broken connection may surface as INTERNAL or UNKNOWN, and a
 * Watch that fell behind is ended RESOURCE_EXHAUSTED.
 */
export const STREAM_RETRYABLE_CODES: ReadonlySet<Status> = new Set([
  ...RETRYABLE_CODES,
  Status.CANCELLED,
  Status.INTERNAL,
  Status.UNKNOWN,
  Status.RESOURCE_EXHAUSTED,
]);

function isServiceError(err: unknown): err is ServiceError {
  return (
    err instanceof Error &&
    typeof (err as Partial<ServiceError>).code === "number" &&
    "details" in err
  );
}

/**
 * Map whatever a grpc-js call failed with to the client's error classes.
 *
 * `decodeBreakdown` turns the `grpc-status-details-bin` trailer into the selection
 * breakdown a RESOURCE_EXHAUSTED Schedule carries.
 */
export function fromServiceError(
  err: unknown,
  decodeBreakdown?: (bin: Buffer) => SelectionBreakdown | null,
): RegistryError {
  if (err instanceof RegistryError) return err;
  if (!isServiceError(err)) {
    const message = err instanceof Error ? err.message : String(err);
    return new RegistryError(message, { code: Status.UNKNOWN, cause: err });
  }
  const code = err.code as Status;
  const details = err.details ?? "";
  const metadata = err.metadata instanceof Metadata ? err.metadata : undefined;
  const options: RegistryErrorOptions = { code, metadata, cause: err };
  if (code === Status.RESOURCE_EXHAUSTED) {
    const bin = metadata?.get("grpc-status-details-bin")[0];
    const breakdown = bin instanceof Buffer && decodeBreakdown ? decodeBreakdown(bin) : null;
    return new ResourceExhausted(details, { ...options, breakdown });
  }
  const cls = BY_CODE.get(code) ?? RegistryError;
  return new cls(details, options);
}
