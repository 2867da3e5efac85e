/**
 * Real processes for the tests: a redis-server on a free loopback port and the sidecar
 * (`python -m registry serve`) in front of it.
 *
 * Never port 6379, never a Redis that was already running: every test file starts its own
 * redis-server (`--save '' --appendonly no`, in a temporary directory) and its own
 * sidecar. Both are stopped in `stop()` (SIGTERM, then SIGKILL after a bounded wait),
 * and, should the test process die first, SIGKILLed from a process 'exit' hook.
 *
 * The sidecar runs with `REGISTRY_PYTHON` (default `<repo>/.venv/bin/python`) from the
 * repository root, which is found above this file.
 */

import { type ChildProcess, spawn } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";

import { RegistryClient } from "../../src";

const START_TIMEOUT_MS = 30_000;
const STOP_TIMEOUT_MS = 5_000;

const live = new Set<ChildProcess>();

function killAll(): void {
  for (const child of live) {
    try {
      child.kill("SIGKILL");
    } catch {
      // already gone
    }
  }
}

// Children never outlive the test process: on a normal exit, and on the signals a runner
// or CI sends when it gives up (their default action would skip the 'exit' hook).
process.once("exit", killAll);
for (const [signal, number] of [["SIGINT", 2], ["SIGTERM", 15], ["SIGHUP", 1]] as const) {
  process.once(signal, () => {
    killAll();
    process.exit(128 + number);
  });
}

/** The repository root: the nearest directory above this file with the proto and the sidecar. */
export function repoRoot(): string {
  let dir = __dirname;
  for (;;) {
    if (
      fs.existsSync(path.join(dir, "proto", "registry", "v1", "registry.proto")) &&
      fs.existsSync(path.join(dir, "registry", "__main__.py"))
    ) {
      return dir;
    }
    const parent = path.dirname(dir);
    if (parent === dir) throw new Error(`repository root not found above ${__dirname}`);
    dir = parent;
  }
}

export function pythonPath(): string {
  return process.env.REGISTRY_PYTHON || path.join(repoRoot(), ".venv", "bin", "python");
}

/** A port the kernel just handed out on 127.0.0.1 (a collision on start is retried). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address ? address.port : 0;
      server.close(() => (port === 6379 ? freePort().then(resolve, reject) : resolve(port)));
    });
  });
}

/** The absolute path of `name` on PATH, or null. */
export function findExecutable(name: string): string | null {
  for (const dir of (process.env.PATH ?? "").split(path.delimiter)) {
    if (!dir) continue;
    const candidate = path.join(dir, name);
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return null;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Poll `check` until it returns a truthy value; throws the last error after `timeoutMs`. */
export async function eventually<T>(
  check: () => Promise<T> | T,
  timeoutMs = 10_000,
  everyMs = 50,
): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown = new Error("condition never held");
  for (;;) {
    try {
      const value = await check();
      if (value) return value as NonNullable<T>;
      last = new Error(`condition not met within ${timeoutMs} ms`);
    } catch (err) {
      last = err;
    }
    if (Date.now() >= deadline) throw last;
    await sleep(everyMs);
  }
}

function tail(file: string, lines = 40): string {
  try {
    return fs.readFileSync(file, "utf8").split("\n").slice(-lines).join("\n");
  } catch {
    return "(no log)";
  }
}

/** Spawn `command` with its output in `logFile`; tracked so it is killed on exit. */
function spawnLogged(
  command: string,
  args: string[],
  logFile: string,
  options: { cwd?: string; env?: NodeJS.ProcessEnv } = {},
): ChildProcess {
  const fd = fs.openSync(logFile, "a");
  try {
    const child = spawn(command, args, {
      cwd: options.cwd,
      env: options.env,
      stdio: ["ignore", fd, fd],
    });
    live.add(child);
    child.once("exit", () => live.delete(child));
    child.once("error", () => live.delete(child));
    return child;
  } finally {
    fs.closeSync(fd);
  }
}

function exited(child: ChildProcess): boolean {
  return child.exitCode !== null || child.signalCode !== null;
}

function waitExit(child: ChildProcess, timeoutMs: number): Promise<boolean> {
  if (exited(child)) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), timeoutMs);
    child.once("exit", () => {
      clearTimeout(timer);
      resolve(true);
    });
  });
}

/** SIGTERM, then SIGKILL after `timeoutMs`; resolves once the process is gone. */
async function terminate(child: ChildProcess | null, timeoutMs = STOP_TIMEOUT_MS): Promise<void> {
  if (child === null || exited(child)) return;
  child.kill("SIGTERM");
  if (await waitExit(child, timeoutMs)) return;
  child.kill("SIGKILL");
  await waitExit(child, timeoutMs);
}

/** Resolves when something at `port` answers a Redis PING with +PONG. */
function redisPing(port: number, timeoutMs = 500): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: "127.0.0.1", port });
    let answer = "";
    const done = (ok: boolean): void => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(timeoutMs, () => done(false));
    socket.once("error", () => done(false));
    socket.once("connect", () => socket.write("PING\r\n"));
    socket.on("data", (chunk) => {
      answer += chunk.toString();
      if (answer.includes("\r\n")) done(answer.startsWith("+PONG"));
    });
  });
}

export class RedisServer {
  port = 0;
  private child: ChildProcess | null = null;

  constructor(private readonly dir: string) {}

  get url(): string {
    return `redis://127.0.0.1:${this.port}/0`;
  }

  get logFile(): string {
    return path.join(this.dir, "redis.log");
  }

  async start(): Promise<void> {
    const binary = findExecutable("redis-server");
    if (binary === null) {
      throw new Error("redis-server not found on PATH; install it (apt-get install -y redis-server)");
    }
    for (let attempt = 1; ; attempt++) {
      this.port = await freePort();
      this.child = spawnLogged(
        binary,
        [
          "--port", String(this.port),
          "--bind", "127.0.0.1",
          "--save", "",
          "--appendonly", "no",
          "--dir", this.dir,
        ],
        this.logFile,
      );
      const deadline = Date.now() + START_TIMEOUT_MS;
      while (Date.now() < deadline && !exited(this.child)) {
        if (await redisPing(this.port)) return;
        await sleep(50);
      }
      await terminate(this.child);
      if (attempt >= 3) {
        throw new Error(`redis-server did not start on ${this.port}:\n${tail(this.logFile)}`);
      }
    }
  }

  async stop(): Promise<void> {
    await terminate(this.child);
    this.child = null;
  }
}

export class Sidecar {
  port = 0;
  private child: ChildProcess | null = null;
  readonly namespace = `nodetest${process.pid}${Math.floor(Math.random() * 1e6)}`;

  constructor(
    private readonly redis: RedisServer,
    private readonly dir: string,
    private readonly extraArgs: string[] = [],
  ) {}

  get target(): string {
    return `127.0.0.1:${this.port}`;
  }

  get logFile(): string {
    return path.join(this.dir, "sidecar.log");
  }

  get pid(): number | undefined {
    return this.child?.pid;
  }

  /** Start on a free port (or, with `samePort`, on the port it had), and wait until ready. */
  async start(samePort = false): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      if (!samePort || this.port === 0) this.port = await freePort();
      try {
        await this.spawnAndWait();
        return;
      } catch (err) {
        await terminate(this.child);
        if (samePort || attempt >= 3) throw err;
      }
    }
  }

  private async spawnAndWait(): Promise<void> {
    const python = pythonPath();
    if (!fs.existsSync(python)) {
      throw new Error(
        `sidecar python ${python} not found; run \`make venv\` at the repo root or set REGISTRY_PYTHON`,
      );
    }
    // Settings come from flags only: drop any REGISTRY_* of the caller's environment.
    const env: NodeJS.ProcessEnv = {};
    for (const [key, value] of Object.entries(process.env)) {
      if (!key.startsWith("REGISTRY_")) env[key] = value;
    }
    fs.appendFileSync(this.logFile, `--- start on ${this.port} at ${new Date().toISOString()}\n`);
    const child = spawnLogged(
      python,
      [
        "-m", "registry", "serve",
        "--listen", this.target,
        "--redis-url", this.redis.url,
        "--namespace", this.namespace,
        "--shutdown-grace-s", "1",
        ...this.extraArgs,
      ],
      this.logFile,
      { cwd: repoRoot(), env },
    );
    this.child = child;
    const client = new RegistryClient(this.target, { timeoutMs: 1_000 });
    try {
      const deadline = Date.now() + START_TIMEOUT_MS;
      for (;;) {
        if (exited(child)) {
          throw new Error(`sidecar exited (${child.exitCode ?? child.signalCode}):\n${tail(this.logFile)}`);
        }
        if (Date.now() > deadline) {
          throw new Error(`sidecar not ready within ${START_TIMEOUT_MS} ms:\n${tail(this.logFile)}`);
        }
        try {
          if ((await client.getStatus({ timeoutMs: 1_000 })).ready) return;
        } catch {
          // not listening yet, or still preloading
        }
        await sleep(100);
      }
    } finally {
      client.close();
    }
  }

  /** SIGKILL: a crash, no clean shutdown. */
  async kill(): Promise<void> {
    const child = this.child;
    if (child === null || exited(child)) return;
    child.kill("SIGKILL");
    await waitExit(child, STOP_TIMEOUT_MS);
  }

  async stop(): Promise<void> {
    await terminate(this.child);
    this.child = null;
  }

  logTail(lines = 40): string {
    return tail(this.logFile, lines);
  }
}

/** A redis-server and a sidecar using it, with a client; `stop()` always stops both. */
export class Stack {
  readonly dir = fs.mkdtempSync(path.join(os.tmpdir(), "registry-node-test-"));
  readonly redis = new RedisServer(this.dir);
  readonly sidecar = new Sidecar(this.redis, this.dir);
  private clients: RegistryClient[] = [];

  static async start(): Promise<Stack> {
    const stack = new Stack();
    try {
      await stack.redis.start();
      await stack.sidecar.start();
    } catch (err) {
      await stack.stop();
      throw err;
    }
    return stack;
  }

  /** A client of this stack's sidecar, closed by `stop()`. */
  client(options: ConstructorParameters<typeof RegistryClient>[1] = {}): RegistryClient {
    const client = new RegistryClient(this.sidecar.target, options);
    this.clients.push(client);
    return client;
  }

  async stop(): Promise<void> {
    for (const client of this.clients) client.close();
    this.clients = [];
    try {
      await this.sidecar.stop();
    } finally {
      await this.redis.stop();
      fs.rmSync(this.dir, { recursive: true, force: true });
    }
  }
}
