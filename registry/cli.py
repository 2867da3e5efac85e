"""Entry point: ``registry serve`` runs the sidecar; ``registry health`` probes one;
``registry ctl`` operates one (see registry/ctl.py and docs/cli.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from registry import config, ctl

log = logging.getLogger("registry")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


async def serve(settings: config.Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Imported here so `registry ctl` and `registry health` start without the server's
    # dependencies (redis, numpy): a CLI call should take a fraction of a second.
    from registry.server import Sidecar

    async with Sidecar(settings):
        await stop.wait()
        log.info("shutting down")


async def probe(target: str, timeout: float) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return False
    serving: bool = reply.status == health_pb2.HealthCheckResponse.SERVING
    print("SERVING" if serving else health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return serving


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="registry", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the sidecar")
    config.add_arguments(serve_p)
    health_p = sub.add_parser("health", help="exit 0 when a sidecar reports SERVING")
    health_p.add_argument("--target", default=None, help="HOST:PORT (default: REGISTRY_LISTEN)")
    health_p.add_argument("--timeout", type=float, default=2.0)
    ctl.configure(sub.add_parser("ctl", help="operate a running sidecar (nodes, pools, watch...)"))
    args = parser.parse_args(argv)

    if args.command == "serve":
        try:
            settings = config.from_sources(args)
        except ValueError as exc:
            parser.error(str(exc))
        configure_logging(settings.log_level, settings.log_format)
        asyncio.run(serve(settings))
        return 0
    if args.command == "ctl":
        return ctl.run(args)
    target = args.target or ctl.default_target()
    return 0 if asyncio.run(probe(target, args.timeout)) else 1


if __name__ == "__main__":
    sys.exit(main())
