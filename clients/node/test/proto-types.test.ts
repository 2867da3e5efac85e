/**
 * The hand-written types in src/types.ts against the proto (the client's "generate:check").
 *
 * Every message of registry.v1 must have an `export interface` of the same name in
 * types.ts with exactly the proto's fields (lowerCamelCase), and every enum a constant
 * object whose values are exactly the proto's value names. Adding a field to the proto
 * without adding it here fails this test, so the types cannot go stale silently.
 */

import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { describe, test } from "node:test";

import * as protobuf from "protobufjs";

import { RegistryClient, loadProto } from "../src";
import * as types from "../src/types";

/** The package root (clients/node): above build-test/test/ when compiled, above test/ in source. */
function packageRoot(): string {
  let dir = __dirname;
  while (!fs.existsSync(path.join(dir, "package.json"))) {
    const parent = path.dirname(dir);
    if (parent === dir) throw new Error(`package.json not found above ${__dirname}`);
    dir = parent;
  }
  return dir;
}

const typesSource = fs.readFileSync(path.join(packageRoot(), "src", "types.ts"), "utf8");

/** Field names of `export interface Name { ... }` in types.ts (top-level members only). */
function interfaceFields(name: string): string[] | null {
  if (new RegExp(`^export interface ${name} \\{\\}$`, "m").test(typesSource)) return [];
  const match = new RegExp(`^export interface ${name} \\{\\n([\\s\\S]*?)^\\}`, "m").exec(
    typesSource,
  );
  if (!match) return null;
  const fields: string[] = [];
  for (const line of (match[1] ?? "").split("\n")) {
    const field = /^ {2}(\w+)\??:/.exec(line);
    if (field?.[1]) fields.push(field[1]);
  }
  return fields.sort();
}

const { root } = loadProto();
const pkg = root.lookup("registry.v1") as protobuf.Namespace;
const messages = pkg.nestedArray.filter((n): n is protobuf.Type => n instanceof protobuf.Type);
const enums = pkg.nestedArray.filter((n): n is protobuf.Enum => n instanceof protobuf.Enum);
const service = pkg.lookupService("RegistryService");

describe("src/types.ts matches registry.proto", () => {
  test("the proto was found and parsed", () => {
    assert.ok(messages.length >= 30, `only ${messages.length} messages`);
    assert.ok(enums.length >= 3);
  });

  for (const message of messages) {
    test(`message ${message.name}`, () => {
      const declared = interfaceFields(message.name);
      assert.ok(declared, `types.ts has no \`export interface ${message.name}\``);
      const expected = message.fieldsArray.map((f) => f.name).sort();
      assert.deepEqual(declared, expected);
    });
  }

  for (const protoEnum of enums) {
    test(`enum ${protoEnum.name}`, () => {
      const constant = (types as unknown as Record<string, Record<string, string>>)[protoEnum.name];
      assert.ok(constant, `types.ts exports no constant ${protoEnum.name}`);
      assert.deepEqual(Object.values(constant).sort(), Object.keys(protoEnum.values).sort());
    });
  }

  test("every RPC has a RegistryClient method", () => {
    const streams: Record<string, string> = { Heartbeat: "heartbeatStream", Watch: "watchStream" };
    for (const method of service.methodsArray) {
      const name = streams[method.name] ?? method.name[0]!.toLowerCase() + method.name.slice(1);
      assert.equal(
        typeof (RegistryClient.prototype as unknown as Record<string, unknown>)[name],
        "function",
        `RegistryClient lacks ${name} for ${method.name}`,
      );
    }
  });
});
