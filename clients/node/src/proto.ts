/**
 * Loads `proto/registry/v1/registry.proto` at runtime (no generated code to go stale).
 *
 * The proto is the repository's single contract; this package does not copy it. It is
 * found, in order: the `protoPath` option, the `REGISTRY_PROTO_PATH` environment
 * variable, then `proto/registry/v1/registry.proto` in the nearest directory above this
 * file that has one (the repository root, from both `src/` and `dist/`).
 */

import * as fs from "node:fs";
import * as path from "node:path";

import type * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import * as protobuf from "protobufjs";

import type { SelectionBreakdown } from "./types";

export const PROTO_RELATIVE_PATH = path.join("proto", "registry", "v1", "registry.proto");
export const SERVICE_NAME = "registry.v1.RegistryService";
export const PACKAGE_NAME = "registry.v1";

/** proto-loader options; `types.ts` describes the objects they produce. */
export const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  arrays: true,
  objects: true,
  oneofs: true,
};

/** Where the proto is, per the module comment; throws naming the places looked at. */
export function findProtoPath(explicit?: string): string {
  const given = explicit ?? process.env.REGISTRY_PROTO_PATH;
  if (given) {
    if (!fs.existsSync(given)) throw new Error(`registry proto not found at ${given}`);
    return path.resolve(given);
  }
  let dir = __dirname;
  for (;;) {
    const candidate = path.join(dir, PROTO_RELATIVE_PATH);
    if (fs.existsSync(candidate)) return candidate;
    const parent = path.dirname(dir);
    if (parent === dir) break;
    dir = parent;
  }
  throw new Error(
    `${PROTO_RELATIVE_PATH} not found above ${__dirname}; ` +
      "pass protoPath or set REGISTRY_PROTO_PATH",
  );
}

/** Everything the client needs from one proto file, loaded once per path. */
export interface LoadedProto {
  readonly protoPath: string;
  /** grpc method definitions (path, serializers) keyed by RPC name, e.g. `RegisterNode`. */
  readonly service: grpc.ServiceDefinition;
  /** protobufjs reflection of the same file (status details, checks). */
  readonly root: protobuf.Root;
  /** Decode the SelectionBreakdown a RESOURCE_EXHAUSTED status carries, if any. */
  decodeBreakdown(statusDetailsBin: Buffer): SelectionBreakdown | null;
}

const cache = new Map<string, LoadedProto>();

export function loadProto(explicitPath?: string): LoadedProto {
  const protoPath = findProtoPath(explicitPath);
  const cached = cache.get(protoPath);
  if (cached) return cached;

  const definition = protoLoader.loadSync(protoPath, LOADER_OPTIONS);
  const service = definition[SERVICE_NAME];
  if (!service || "format" in service) {
    throw new Error(`${protoPath} does not define service ${SERVICE_NAME}`);
  }
  const root = new protobuf.Root().loadSync(protoPath, { keepCase: false });
  root.resolveAll();
  const breakdownType = root.lookupType(`${PACKAGE_NAME}.SelectionBreakdown`);
  const breakdownUrl = `type.googleapis.com/${PACKAGE_NAME}.SelectionBreakdown`;

  const loaded: LoadedProto = {
    protoPath,
    service: service as unknown as grpc.ServiceDefinition,
    root,
    decodeBreakdown(bin: Buffer): SelectionBreakdown | null {
      try {
        const status = RpcStatus.decode(bin) as unknown as DecodedStatus;
        for (const detail of status.details ?? []) {
          if (detail.typeUrl === breakdownUrl) {
            const message = breakdownType.decode(detail.value);
            return breakdownType.toObject(message, {
              longs: Number,
              defaults: true,
            }) as SelectionBreakdown;
          }
        }
      } catch {
        // A malformed detail must not hide the status itself.
      }
      return null;
    },
  };
  cache.set(protoPath, loaded);
  return loaded;
}

// google.rpc.Status, wire-compatible, with a plain stand-in for google.protobuf.Any so
// protobufjs applies none of its Any conversions.
const statusRoot = protobuf.Root.fromJSON({
  nested: {
    registry_client_internal: {
      nested: {
        Any: {
          fields: {
            typeUrl: { type: "string", id: 1 },
            value: { type: "bytes", id: 2 },
          },
        },
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
});
const RpcStatus = statusRoot.lookupType("registry_client_internal.Status");

interface DecodedStatus {
  code: number;
  message: string;
  details?: { typeUrl: string; value: Uint8Array }[];
}
