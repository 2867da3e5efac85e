/**
 * Node.js client of the node-registry sidecar (`registry.v1.RegistryService`).
 *
 * ```ts
 * import { RegistryClient } from "@node-registry/client";
 * const client = new RegistryClient("127.0.0.1:50051");
 * const { node } = await client.getNode("gpu-7");
 * ```
 */

export {
  DEFAULT_MAX_RECEIVE_BYTES,
  DEFAULT_MAX_SEND_BYTES,
  DEFAULT_TIMEOUT_MS,
  RegistryClient,
  defaultChannelOptions,
  selectRequest,
} from "./client";
export type { CallOptions, HealthStatus, RegistryClientOptions } from "./client";
export {
  Aborted,
  AlreadyExists,
  Cancelled,
  DeadlineExceeded,
  FailedPrecondition,
  Internal,
  InvalidArgument,
  NotFound,
  RETRYABLE_CODES,
  RegistryError,
  ResourceExhausted,
  STREAM_RETRYABLE_CODES,
  Status,
  StreamBroken,
  Unavailable,
  Unimplemented,
  fromServiceError,
} from "./errors";
export type { RegistryErrorOptions } from "./errors";
export { backoffDelayMs } from "./internal";
export type { BackoffOptions } from "./internal";
export { LOADER_OPTIONS, findProtoPath, loadProto } from "./proto";
export type { LoadedProto } from "./proto";
export { HeartbeatSession, silentLogger, stderrLogger } from "./session";
export type {
  HeartbeatSessionEvents,
  HeartbeatSessionOptions,
  JobsProvider,
  Logger,
  MetricsProvider,
} from "./session";
export { Watcher } from "./watch";
export type { WatcherOptions } from "./watch";
export * from "./types";
