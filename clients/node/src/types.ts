/**
 * TypeScript shapes of every `registry.v1` message, as this client sends and receives them.
 *
 * They describe what `@grpc/proto-loader` produces from `proto/registry/v1/registry.proto`
 * with the options in `proto.ts` (`LOADER_OPTIONS`):
 *
 * - field names are lowerCamelCase (`node_id` -> `nodeId`);
 * - enums are their value names as strings (`"NODE_STATUS_ONLINE"`);
 * - 64-bit integers (`int64`, `uint64`) are JS numbers: versions, counters and
 *   millisecond timestamps stay far below 2^53;
 * - every scalar, list and map is always present in a received message (proto3
 *   defaults filled in); a message-typed field is `null` when the sender left it unset.
 *
 * The file is hand-written, not generated: `test/proto-types.test.ts` (also
 * `npm run check:proto`) fails when a message, field or enum value of the proto is
 * missing here or named differently, so the types cannot silently go stale.
 */

// ------------------------------------------------------------------------------ enums

/** A node's place in its lifecycle. */
export const NodeStatus = {
  UNSPECIFIED: "NODE_STATUS_UNSPECIFIED",
  /** Takes new jobs. */
  ONLINE: "NODE_STATUS_ONLINE",
  /** Visible, runs its current jobs, takes no new ones. */
  DRAINING: "NODE_STATUS_DRAINING",
  /** Missed its liveness deadline; removed after a grace period unless it registers again. */
  OFFLINE: "NODE_STATUS_OFFLINE",
} as const;
export type NodeStatus = (typeof NodeStatus)[keyof typeof NodeStatus];

/** What a node should do after a heartbeat. */
export const HeartbeatAction = {
  UNSPECIFIED: "HEARTBEAT_ACTION_UNSPECIFIED",
  /** Heartbeat recorded; keep going. */
  CONTINUE: "HEARTBEAT_ACTION_CONTINUE",
  /** The registry does not know the node or it expired: call RegisterNode. */
  REGISTER: "HEARTBEAT_ACTION_REGISTER",
  /** Heartbeat accepted into the sidecar's buffer while Redis is unreachable. */
  BUFFERED: "HEARTBEAT_ACTION_BUFFERED",
} as const;
export type HeartbeatAction = (typeof HeartbeatAction)[keyof typeof HeartbeatAction];

/** What a WatchEvent carries. */
export const WatchEventType = {
  UNSPECIFIED: "WATCH_EVENT_TYPE_UNSPECIFIED",
  /** One node of the initial state. */
  SNAPSHOT: "WATCH_EVENT_TYPE_SNAPSHOT",
  /** The snapshot is complete; live events follow. */
  SNAPSHOT_END: "WATCH_EVENT_TYPE_SNAPSHOT_END",
  /** A node was created or changed; `node` holds its new state. */
  PUT: "WATCH_EVENT_TYPE_PUT",
  /** A node was removed (or left the watched pool); `nodeId` names it. */
  DELETE: "WATCH_EVENT_TYPE_DELETE",
  /** Nothing changed; `resumeToken` is the current position. */
  BOOKMARK: "WATCH_EVENT_TYPE_BOOKMARK",
} as const;
export type WatchEventType = (typeof WatchEventType)[keyof typeof WatchEventType];

// ------------------------------------------------------------------------------ nodes

export interface LanguagePair {
  /** Source language code, e.g. "en" or "zh-Hans". */
  src: string;
  /** Target language code. */
  tgt: string;
}

export interface InstalledService {
  name: string;
  type: string;
  version: string;
}

/** Load figures reported by a node, each a fraction in [0, 1]. */
export interface NodeMetrics {
  cpu: number;
  gpu: number;
  mem: number;
  load: number;
  errorRate: number;
  /** Output only: how late the last heartbeat was, as a fraction of the interval. */
  heartbeatDelay: number;
}

/** One worker machine as the registry knows it. */
export interface Node {
  /** Unique id: 1-128 characters of [A-Za-z0-9._-]. */
  nodeId: string;
  address: string;
  pools: string[];
  langPairs: LanguagePair[];
  services: InstalledService[];
  labels: Record<string, string>;
  /** Maximum number of concurrent jobs (slots). */
  capacity: number;
  /** Output only. */
  status: NodeStatus;
  /** Output only; null until a heartbeat reported metrics. */
  metrics: NodeMetrics | null;
  /** Output only: number of live slot reservations. */
  runningJobs: number;
  /** Output only: in [0, 1], higher is healthier. */
  healthScore: number;
  /** Output only: registry version of the node's last change. */
  version: number;
  /** Output only: ms since the Unix epoch (Redis clock). */
  registeredAt: number;
  /** Output only: ms since the Unix epoch (Redis clock). */
  lastHeartbeatAt: number;
  /** Output only: liveness TTL in milliseconds. */
  ttlMs: number;
}

/** How current the replica behind a read response is. */
export interface Freshness {
  version: number;
  stalenessMs: number;
  degraded: boolean;
}

export interface RegisterNodeRequest {
  node: NodeInit;
  ttlMs: number;
}

export interface RegisterNodeResponse {
  node: Node | null;
}

export interface HeartbeatRequest {
  nodeId: string;
  seq: number;
  metrics: MetricsInit | null;
  runningJobIds: string[];
  reportJobs: boolean;
}

export interface HeartbeatResponse {
  seq: number;
  version: number;
  status: NodeStatus;
  action: HeartbeatAction;
  deadlineMs: number;
  intervalMs: number;
  releasedJobIds: string[];
}

export interface DeregisterNodeRequest {
  nodeId: string;
}

export interface DeregisterNodeResponse {
  /** False when the node was already absent (nothing changed). */
  existed: boolean;
  version: number;
}

export interface DrainNodeRequest {
  nodeId: string;
}

export interface DrainNodeResponse {
  node: Node | null;
}

export interface GetNodeRequest {
  nodeId: string;
}

export interface GetNodeResponse {
  node: Node | null;
  freshness: Freshness | null;
}

export interface ListNodesRequest {
  poolId: string;
  langPair: LanguagePair | null;
  status: NodeStatus;
  labels: Record<string, string>;
}

export interface ListNodesResponse {
  nodes: Node[];
  freshness: Freshness | null;
}

export interface SelectNodesRequest {
  poolId: string;
  langPair: LanguagePair | null;
  requiredServices: string[];
  labels: Record<string, string>;
  count: number;
  excludeNodeIds: string[];
  minHealth: number;
}

/** Per reason, the nodes a selection excluded (each counted once, under its first filter). */
export interface SelectionBreakdown {
  considered: number;
  excludedId: number;
  offline: number;
  draining: number;
  wrongPool: number;
  wrongLangPair: number;
  missingService: number;
  labels: number;
  lowHealth: number;
  full: number;
  eligible: number;
}

export interface SelectNodesResponse {
  /** Best first. */
  nodes: Node[];
  breakdown: SelectionBreakdown | null;
  freshness: Freshness | null;
}

export interface ReserveSlotRequest {
  nodeId: string;
  jobId: string;
  leaseMs: number;
}

export interface ReserveSlotResponse {
  node: Node | null;
  /** False when this job already held the slot (the lease was renewed). */
  created: boolean;
  leaseDeadlineMs: number;
  /**
   * True when Redis was unreachable and the sidecar granted the slot from its local view
   * (reservation policy "local"); it is replayed to Redis on recovery.
   */
  buffered: boolean;
}

export interface ReleaseSlotRequest {
  nodeId: string;
  jobId: string;
}

export interface ReleaseSlotResponse {
  /** False when the job held no slot on the node (nothing changed). */
  released: boolean;
  /** Null when the sidecar did not return the node (e.g. it is gone). */
  node: Node | null;
}

export interface ScheduleRequest {
  selector: SelectNodesRequest | null;
  jobId: string;
  leaseMs: number;
}

export interface ScheduleResponse {
  node: Node | null;
  breakdown: SelectionBreakdown | null;
  leaseDeadlineMs: number;
  /** Reservations tried, the successful one included. */
  attempts: number;
  /** False when the job already held its slot (a retried Schedule). */
  created: boolean;
  /** True when granted from the sidecar's local view while Redis was unreachable. */
  buffered: boolean;
}

export interface WatchRequest {
  resumeToken: string;
  poolId: string;
}

export interface WatchEvent {
  type: WatchEventType;
  /** Set for SNAPSHOT and PUT. */
  node: Node | null;
  nodeId: string;
  version: number;
  /** Opaque; pass it back to resume after this event. */
  resumeToken: string;
}

// ------------------------------------------------------------------------------ pools

/** How a pool ranks its candidates (relative health weights and the free-slot exponent). */
export interface SelectionWeights {
  cpu: number;
  gpu: number;
  mem: number;
  load: number;
  heartbeatDelay: number;
  errorRate: number;
  freeCapacity: number;
}

export interface Pool {
  poolId: string;
  langPairs: LanguagePair[];
  requiredServices: string[];
  labels: Record<string, string>;
  minHealth: number;
  /** Null: the sidecar's default weights. */
  weights: SelectionWeights | null;
  /** Output only. */
  version: number;
}

export interface PutPoolRequest {
  pool: PoolInit;
}

export interface PutPoolResponse {
  pool: Pool | null;
}

export interface GetPoolRequest {
  poolId: string;
}

export interface GetPoolResponse {
  pool: Pool | null;
}

export interface ListPoolsRequest {}

export interface ListPoolsResponse {
  pools: Pool[];
}

// ------------------------------------------------------------------------------ status

export interface GetStatusRequest {}

export interface GetStatusResponse {
  /** NORMAL, L2_ONLY or LOCAL_ONLY. */
  mode: string;
  version: number;
  nodeCount: number;
  redisVersion: number;
  stalenessMs: number;
  /** True once the initial preload finished. */
  ready: boolean;
  epoch: string;
  namespace: string;
  uptimeMs: number;
  eventsApplied: number;
  reloads: number;
  watchers: number;
  heartbeatStreams: number;
  redisLatencyP50Us: number;
  redisLatencyP99Us: number;
  poolCount: number;
  lagVersions: number;
  lagMs: number;
  versionChecks: number;
  versionCheckTimeouts: number;
  catchups: number;
  repairs: number;
  revalidated: number;
  drift: number;
  missMarkers: number;
  bufferedHeartbeats: number;
  bufferedWrites: number;
  modeTransitions: number;
  degradedMs: number;
  outages: number;
  lastOutageMs: number;
  rebuilds: number;
  bufferRefused: number;
}

// ------------------------------------------------------------------------------ inputs

/** A language pair as an object or as a `[src, tgt]` tuple. */
export type LangPairLike = LanguagePair | readonly [src: string, tgt: string];

/** What a caller passes to register a node: `nodeId` and `capacity` are required. */
export interface NodeInit {
  nodeId: string;
  capacity: number;
  address?: string;
  pools?: string[];
  langPairs?: LanguagePair[];
  services?: InstalledService[];
  labels?: Record<string, string>;
}

/** Metrics a heartbeat reports; omitted figures are sent as 0. */
export type MetricsInit = Partial<Omit<NodeMetrics, "heartbeatDelay">>;

/** What a caller passes to PutPool: `poolId` is required. */
export interface PoolInit {
  poolId: string;
  langPairs?: LanguagePair[];
  requiredServices?: string[];
  labels?: Record<string, string>;
  minHealth?: number;
  /** Omit (or null) for the sidecar's defaults. */
  weights?: Partial<SelectionWeights> | null;
}

/** The selector shared by SelectNodes and Schedule; every filter is optional. */
export interface Selector {
  poolId?: string;
  langPair?: LangPairLike | null;
  requiredServices?: string[];
  labels?: Record<string, string>;
  /** How many candidates to return; 0 or omitted means one. */
  count?: number;
  excludeNodeIds?: string[];
  minHealth?: number;
}

/** Filters of ListNodes; every one is optional, none lists the whole fleet. */
export interface NodeFilter {
  poolId?: string;
  langPair?: LangPairLike | null;
  status?: NodeStatus;
  labels?: Record<string, string>;
}

/** `T` with fields `K` guaranteed non-null (the client checks them on every response). */
export type WithRequired<T, K extends keyof T> = Omit<T, K> & { [P in K]: NonNullable<T[P]> };
