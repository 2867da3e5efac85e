"""``registry ctl``: operate a running sidecar from a shell, through its gRPC API.

Every command is one RPC of ``registry.v1.RegistryService`` (``watch`` is the stream), made
with the Python client, so the CLI sees exactly what any other client sees. Output is an
aligned table or a key/value block; ``--json`` prints the response as protobuf JSON instead
(one document per command, one object per line for ``watch``). A failed RPC prints one line
to stderr, ``registry ctl: CODE: details``, and exits with a code from :data:`EXIT_TABLE`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import textwrap
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO, cast

import grpc
import grpc.aio
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_status import rpc_status

from registry import config
from registry import ctl_format as fmt
from registry_client import RegistryClient, RegistryError, pb

DEFAULT_TIMEOUT_S = 5.0

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4
EXIT_CONFLICT = 5
EXIT_UNAVAILABLE = 6
EXIT_INTERRUPTED = 130

_S = grpc.StatusCode
EXIT_TABLE: tuple[tuple[int, tuple[grpc.StatusCode, ...], str], ...] = (
    (EXIT_OK, (), "success"),
    (EXIT_ERROR, (), "any other error (INTERNAL, UNKNOWN, UNIMPLEMENTED, ...)"),
    (EXIT_USAGE, (), "usage error: bad flags or arguments, unreadable --from-file"),
    (EXIT_NOT_FOUND, (_S.NOT_FOUND,), "no such node or pool"),
    (
        EXIT_REFUSED,
        (_S.INVALID_ARGUMENT, _S.FAILED_PRECONDITION, _S.OUT_OF_RANGE),
        "refused as asked: a bad field, named in the message, or a node in the wrong state",
    ),
    (
        EXIT_CONFLICT,
        (_S.RESOURCE_EXHAUSTED, _S.ALREADY_EXISTS, _S.ABORTED),
        "no free slot, or a conflict: the job holds a slot on another node",
    ),
    (
        EXIT_UNAVAILABLE,
        (_S.UNAVAILABLE, _S.DEADLINE_EXCEEDED),
        "the sidecar (for writes, its Redis) is unreachable or too slow: retry later",
    ),
    (EXIT_INTERRUPTED, (), "interrupted (Ctrl-C); watch exits 0 instead"),
)
"""Exit code, the gRPC status codes that lead to it, and its meaning; the help text and
docs/cli.md are written from it."""

_EXIT_BY_CODE: dict[grpc.StatusCode, int] = {
    code: exit_code for exit_code, codes, _ in EXIT_TABLE for code in codes
}


def exit_code(code: grpc.StatusCode) -> int:
    """The process exit code for an RPC that failed with ``code``."""
    return _EXIT_BY_CODE.get(code, EXIT_ERROR)


def _epilog() -> str:
    lines = ["exit codes:"]
    for number, codes, meaning in EXIT_TABLE:
        names = f" ({', '.join(c.name for c in codes)})" if codes else ""
        text = f"  {number:<3}  {meaning}{names}"
        lines.append(textwrap.fill(text, width=88, subsequent_indent=" " * 7))
    lines += [
        "",
        "--target, --json and --timeout may also follow the command.",
        "examples:",
        "  registry ctl nodes list --pool translate --status online",
        "  registry ctl --json nodes get gpu-7 | jq .node.runningJobs",
        "  registry ctl select --pool translate --lang en:de --count 3",
        "  registry ctl watch --pool translate --live --count 1 --timeout 30",
    ]
    return "\n".join(lines)


class UsageError(Exception):
    """Input the CLI refuses before calling the sidecar (exit code 2)."""


def default_target() -> str:
    """The local sidecar's address: ``REGISTRY_LISTEN`` (through config, the only reader of
    the environment), with a wildcard listen host dialled on loopback."""
    listen = config.from_sources().listen
    host, _, port = listen.rpartition(":")
    wildcard = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}
    return f"{wildcard.get(host, host)}:{port}"


# -- argument types -----------------------------------------------------------------------


def _lang_pair(text: str) -> pb.LanguagePair:
    src, sep, tgt = text.partition(":")
    if not sep or not src or not tgt:
        raise argparse.ArgumentTypeError(f"expected SRC:TGT (e.g. en:de), got {text!r}")
    return pb.LanguagePair(src=src, tgt=tgt)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


_WEIGHT_NAMES = tuple(f.name for f in pb.SelectionWeights.DESCRIPTOR.fields)


def _weight(text: str) -> tuple[str, float]:
    name, value = _key_value(text)
    if name not in _WEIGHT_NAMES:
        raise argparse.ArgumentTypeError(f"weight must be one of {', '.join(_WEIGHT_NAMES)}")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"weight {name}: {value!r} is not a number") from None


_STATUSES = {
    "online": pb.NODE_STATUS_ONLINE,
    "draining": pb.NODE_STATUS_DRAINING,
    "offline": pb.NODE_STATUS_OFFLINE,
}


# -- output ---------------------------------------------------------------------------------


class Output:
    """Where results, warnings and errors go, and whether results are JSON."""

    def __init__(self, stdout: TextIO, stderr: TextIO, *, as_json: bool) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.as_json = as_json

    def result(self, message: Message, render: Callable[[], str]) -> None:
        """The response as JSON with --json, else as ``render()`` draws it."""
        print(fmt.to_json(message) if self.as_json else render(), file=self.stdout)

    def event(self, event: pb.WatchEvent) -> None:
        line = fmt.to_json(event, indent=None) if self.as_json else fmt.event_line(event)
        print(line, file=self.stdout, flush=True)

    def warn(self, text: str) -> None:
        print(f"registry ctl: warning: {text}", file=self.stderr)

    def error(self, text: str) -> None:
        print(f"registry ctl: {text}", file=self.stderr)

    def check_fresh(self, fresh: pb.Freshness) -> None:
        if fresh.degraded:
            self.warn(f"answered from the replica alone: {fmt.freshness(fresh)}")


Handler = Callable[[RegistryClient, argparse.Namespace, Output], Awaitable[int]]


# -- commands -------------------------------------------------------------------------------


async def _nodes_list(client: RegistryClient, args: argparse.Namespace, out: Output) -> int:
    response = await client.list_nodes(
        pool_id=args.pool,
        lang_pair=args.lang,
        status=_STATUSES[args.status] if args.status else pb.NODE_STATUS_UNSPECIFIED,
        labels=dict(args.label),
    )
    out.result(response, lambda: fmt.nodes_table(response.nodes))
    out.check_fresh(response.freshness)
    return EXIT_OK


async def _nodes_get(client: RegistryClient, args: argparse.Namespace, out: Output) -> int:
    response = await client.get_node(args.node_id)
    out.result(response, lambda: fmt.node_details(response.node, response.freshness))
    out.check_fresh(response.freshness)
    return EXIT_OK


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    """The selector flags as the client's keywords (SelectNodes and Schedule share them)."""
    return {
        "lang_pair": args.lang,
        "required_services": args.service,
        "labels": dict(args.label),
        "count": args.count,
        "exclude_node_ids": args.exclude,
        "min_health": args.min_health,
    }


async def _select(client: RegistryClient, args: argparse.Namespace, out: Output) -> int:
    response = await client.select_nodes(args.pool, **_filters(args))
    out.result(response, lambda: fmt.selection(response))
    out.check_fresh(response.freshness)
    return EXIT_OK


async def _schedule(client: RegistryClient, args: argparse.Namespace, out: Output) -> int:
    response = await client.schedule(
        args.job_id, args.pool, lease_ms=args.lease_ms, **_filters(args)
    )
    out.result(response, lambda: fmt.scheduled(args.job_id, response))
    return EXIT_OK


async def _reserve(client: RegistryClient, args: argparse.Namespace, out: Output) -> int:
    response = await client.reserve_slot(args.node_id, args.job_id, lease_ms=args.lease_ms)
    verb = "reserved" if response.created else "renewed"
    out.result(
        response,
        lambda: (
            f"{args.job_id}: {verb} on {response.node.node_id} until "
            f"{fmt.timestamp(response.lease_deadline_ms)} (jobs {fmt.jobs(response.node)})"
            + (" [buffered: Redis unreachable, replayed later]" if response.buffered else "")
        ),
    )
    return EXIT_OK


async def _release(client: RegistryClient, args: argparse.Namespace, out: Output) -> int:
    response = await client.release_slot(args.node_id, args.job_id)
    done = "released" if response.released else "held no slot there (nothing changed)"
    out.result(response, lambda: f"{args.job_id}: {done} on {args.node_id}")
    return EXIT_OK


async def _drain(client: RegistryClient, args: argparse.Namespace, out: Output) -> int:
    response = await client.drain_node(args.node_id)
    node = response.node
    out.result(
        response,
        lambda: f"{node.node_id}: {fmt.node_status(node.status)}, {fmt.jobs(node)} jobs running",
    )
    return EXIT_OK


async def _deregister(client: RegistryClient, args: argparse.Namespace, out: Output) -> int:
    response = await client.deregister_node(args.node_id)
    done = (
        f"deregistered (version {response.version})"
        if response.existed
        else "was not registered (nothing changed)"
    )
    out.result(response, lambda: f"{args.node_id}: {done}")
    return EXIT_OK


async def _pools_list(client: RegistryClient, args: argparse.Namespace, out: Output) -> int:
    response = await client.list_pools()
    out.result(response, lambda: fmt.pools_table(response.pools))
    return EXIT_OK


async def _pools_get(client: RegistryClient, args: argparse.Namespace, out: Output) -> int:
    response = await client.get_pool(args.pool_id)
    out.result(response, lambda: fmt.pool_details(response.pool))
    return EXIT_OK


def _pool_from_args(args: argparse.Namespace, stdin: TextIO) -> pb.Pool:
    """The pool of ``--from-file`` (if any) with the flags applied on top."""
    pool = pb.Pool()
    if args.from_file is not None:
        try:
            text = stdin.read() if args.from_file == "-" else Path(args.from_file).read_text()
            json_format.Parse(text, pool)
        except (OSError, json_format.ParseError) as exc:
            raise UsageError(f"--from-file {args.from_file}: {exc}") from exc
        if pool.pool_id and pool.pool_id != args.pool_id:
            raise UsageError(
                f"--from-file names pool {pool.pool_id!r}, the command {args.pool_id!r}"
            )
    pool.pool_id = args.pool_id
    pool.lang_pairs.extend(args.lang)
    pool.required_services.extend(args.service)
    pool.labels.update(dict(args.label))
    if args.min_health is not None:
        pool.min_health = args.min_health
    if args.weight:
        pool.weights.SetInParent()
        for name, value in args.weight:
            setattr(pool.weights, name, value)
    return pool


async def _pools_put(client: RegistryClient, args: argparse.Namespace, out: Output) -> int:
    response = await client.put_pool(_pool_from_args(args, sys.stdin))
    out.result(response, lambda: fmt.pool_details(response.pool))
    return EXIT_OK


async def _status(client: RegistryClient, args: argparse.Namespace, out: Output) -> int:
    response = await client.get_status()
    out.result(response, lambda: fmt.status_details(response))
    return EXIT_OK


async def _watch(client: RegistryClient, args: argparse.Namespace, out: Output) -> int:
    """Print events until --count of them were shown, --timeout ran out, or Ctrl-C.

    The first stream fails fast (an unreachable sidecar exits 6 at once); once an event
    arrived the stream is reopened after a break, resuming from the last token, up to
    --max-reconnects times in a row.
    """
    hidden: set[pb.WatchEventType.ValueType] = set()
    if args.live:
        hidden |= {pb.WATCH_EVENT_TYPE_SNAPSHOT, pb.WATCH_EVENT_TYPE_SNAPSHOT_END}
    if args.no_bookmarks:
        hidden.add(pb.WATCH_EVENT_TYPE_BOOKMARK)
    shown = 0
    try:
        async with (
            asyncio.timeout(args.timeout),
            client.watch(args.pool, resume_token=args.resume_token, max_reconnects=0) as watcher,
        ):
            async for event in watcher:
                watcher.max_reconnects = args.max_reconnects
                if event.type in hidden:
                    continue
                out.event(event)
                shown += 1
                if args.count and shown >= args.count:
                    break
    except TimeoutError:
        pass  # --timeout: watched as long as asked
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------------


def _common_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--target, --json and --timeout; on the commands they default to SUPPRESS, so a value
    given before the command is not overwritten by the command's default."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--target",
        metavar="HOST:PORT",
        default=default(None),
        help="sidecar address (default: REGISTRY_LISTEN, else 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the response as protobuf JSON (watch: one object per line)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=default(None),
        help=f"deadline of the call (default {DEFAULT_TIMEOUT_S:g}); "
        "for watch, how long to watch (default: until Ctrl-C or --count)",
    )


def _node_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool", default="", help="only nodes declaring this pool")
    parser.add_argument(
        "--lang", type=_lang_pair, metavar="SRC:TGT", help="only nodes serving this pair"
    )
    parser.add_argument(
        "--label",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only nodes with this label (repeatable; all must match)",
    )


def _selector_options(parser: argparse.ArgumentParser) -> None:
    _node_filters(parser)
    parser.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME",
        help="a service every candidate must have installed (repeatable)",
    )
    parser.add_argument(
        "--count", type=int, default=0, help="how many candidates to consider (default 1)"
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="NODE_ID",
        help="never pick this node (repeatable)",
    )
    parser.add_argument(
        "--min-health", type=float, default=0.0, metavar="X", help="lowest health, in [0, 1]"
    )


def _lease_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lease-ms", type=int, default=0, metavar="MS", help="slot lease (default: sidecar's)"
    )


def configure(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` (``registry ctl``'s) its options and commands; each command sets
    ``handler``, which :func:`run` calls."""
    parser.description = (
        "Operate a running sidecar through its gRPC API: nodes, pools, selection, "
        "scheduling, watch, status."
    )
    parser.epilog = _epilog()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _common_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, defaults=False)
    commands = parser.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")

    def command(
        group: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        handler: Handler,
        help_text: str,
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    nodes = commands.add_parser("nodes", help="list nodes or show one").add_subparsers(
        dest="nodes_command", required=True, metavar="COMMAND"
    )
    p = command(nodes, "list", _nodes_list, "list nodes (ListNodes), filtered")
    _node_filters(p)
    p.add_argument("--status", choices=sorted(_STATUSES), help="only nodes in this status")
    p = command(nodes, "get", _nodes_get, "show one node (GetNode)")
    p.add_argument("node_id", metavar="NODE_ID")

    p = command(commands, "select", _select, "rank candidate nodes for a job (SelectNodes)")
    _selector_options(p)
    p = command(commands, "schedule", _schedule, "select and reserve a slot for a job (Schedule)")
    p.add_argument("job_id", metavar="JOB_ID")
    _selector_options(p)
    _lease_option(p)
    p = command(commands, "reserve", _reserve, "reserve a slot on a node (ReserveSlot)")
    p.add_argument("node_id", metavar="NODE_ID")
    p.add_argument("job_id", metavar="JOB_ID")
    _lease_option(p)
    p = command(commands, "release", _release, "free a job's slot (ReleaseSlot)")
    p.add_argument("node_id", metavar="NODE_ID")
    p.add_argument("job_id", metavar="JOB_ID")
    p = command(commands, "drain", _drain, "stop new jobs on a node (DrainNode)")
    p.add_argument("node_id", metavar="NODE_ID")
    p = command(commands, "deregister", _deregister, "remove a node (DeregisterNode)")
    p.add_argument("node_id", metavar="NODE_ID")

    pools = commands.add_parser("pools", help="list, show or write pools").add_subparsers(
        dest="pools_command", required=True, metavar="COMMAND"
    )
    command(pools, "list", _pools_list, "list every pool (ListPools)")
    p = command(pools, "get", _pools_get, "show one pool (GetPool)")
    p.add_argument("pool_id", metavar="POOL_ID")
    p = command(
        pools,
        "put",
        _pools_put,
        "create or replace a pool (PutPool); fields not given are cleared",
    )
    p.add_argument("pool_id", metavar="POOL_ID")
    p.add_argument(
        "--from-file",
        metavar="PATH",
        help="a Pool as protobuf JSON ('-': stdin); the flags below add to it",
    )
    p.add_argument(
        "--lang",
        type=_lang_pair,
        action="append",
        default=[],
        metavar="SRC:TGT",
        help="a language pair of the pool (repeatable)",
    )
    p.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME",
        help="a service every node selected in the pool must have (repeatable)",
    )
    p.add_argument(
        "--label",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label every node selected in the pool must carry (repeatable)",
    )
    p.add_argument("--min-health", type=float, metavar="X", help="lowest health, in [0, 1]")
    p.add_argument(
        "--weight",
        type=_weight,
        action="append",
        default=[],
        metavar="NAME=X",
        help=f"a selection weight ({', '.join(_WEIGHT_NAMES)}); any --weight replaces the "
        "sidecar's defaults, so give each one that matters",
    )

    command(commands, "status", _status, "the sidecar's mode, versions and counters (GetStatus)")

    p = command(commands, "watch", _watch, "print node changes as they happen (Watch)")
    p.add_argument("--pool", default="", help="only events about nodes of this pool")
    p.add_argument(
        "--resume-token", default="", metavar="TOKEN", help="resume after this event's token"
    )
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N events")
    p.add_argument(
        "--live", action="store_true", help="hide the initial snapshot; show changes only"
    )
    p.add_argument("--no-bookmarks", action="store_true", help="hide BOOKMARK events")
    p.add_argument(
        "--max-reconnects",
        type=int,
        default=None,
        metavar="N",
        help="give up after N failed reopenings in a row (default: never)",
    )


def build_parser(prog: str = "registry ctl") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    configure(parser)
    return parser


# -- running --------------------------------------------------------------------------------


def _breakdown_detail(exc: RegistryError) -> pb.SelectionBreakdown | None:
    """The SelectionBreakdown a refused Schedule carries as a google.rpc.Status detail."""
    cause = exc.__cause__
    if not isinstance(cause, grpc.aio.AioRpcError):
        return None
    # The stubs type AioRpcError's metadata as the sync error's; it quacks like a grpc.Call.
    status = rpc_status.from_call(cast(grpc.Call, cause))
    for detail in status.details if status is not None else ():
        breakdown = pb.SelectionBreakdown()
        if detail.Unpack(breakdown):
            return breakdown
    return None


def error_line(exc: RegistryError) -> str:
    """``CODE: details``, plus the selection breakdown when the server sent one."""
    breakdown = _breakdown_detail(exc)
    return str(exc) + (f" ({fmt.breakdown(breakdown)})" if breakdown is not None else "")


async def _call(handler: Handler, target: str, args: argparse.Namespace, out: Output) -> int:
    timeout = args.timeout if args.timeout is not None else DEFAULT_TIMEOUT_S
    async with RegistryClient(target, timeout=timeout) as client:
        return await handler(client, args, out)


def run(
    args: argparse.Namespace, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Run the command ``args`` was parsed into (by a parser :func:`configure` set up)."""
    out = Output(stdout or sys.stdout, stderr or sys.stderr, as_json=args.json)
    handler: Handler = args.handler
    try:
        target = args.target or default_target()
    except ValueError as exc:
        out.error(f"error: no --target, and the configuration is invalid: {exc}")
        return EXIT_USAGE
    try:
        return asyncio.run(_call(handler, target, args, out))
    except KeyboardInterrupt:
        return EXIT_OK if handler is _watch else EXIT_INTERRUPTED
    except BrokenPipeError:
        # `registry ctl watch | head -1`: the reader is gone, which ends the command. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        if out.stdout is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except RegistryError as exc:
        out.error(error_line(exc))
        return exit_code(exc.code)
    except UsageError as exc:
        out.error(f"error: {exc}")
        return EXIT_USAGE


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """``registry ctl ARGS``: parse, run, return the exit code (usage errors return 2)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return run(args, stdout=stdout, stderr=stderr)


if __name__ == "__main__":
    sys.exit(main())
