"""Entry point: ``registry serve`` runs the sidecar; ``registry health`` probes one;
``registry ctl`` operates one (see registry/ctl.py and docs/cli.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from registry import config, ctl

if TYPE_CHECKING:
    from registry.server import Sidecar

log = logging.getLogger("registry")

START_CANCEL_S = 5.0
"""How long a cancelled start-up may take to unwind before the sidecar is closed anyway."""
FORCED_EXIT_S = 2.0
"""After a second signal, how long the abandoned shutdown may unwind before ``os._exit``."""


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


async def serve(settings: config.Settings) -> int:
    """Run the sidecar until SIGTERM or SIGINT; return the exit status.

    Start-up may wait for Redis indefinitely, so it runs as a task raced against the
    signal: a stop during start-up must not wait for Redis (it once took 634 s). A second
    signal abandons a shutdown that takes too long.
    """
    # Imported here so `registry ctl` and `registry health` start without the server's
    # dependencies (redis, numpy): a CLI call should take a fraction of a second.
    from registry.server import Sidecar

    stop = asyncio.Event()
    forced: list[int] = []
    main = asyncio.current_task()
    assert main is not None

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("%s received", sig.name)
            stop.set()
        elif not forced:
            code = 128 + sig.value
            forced.append(code)
            log.warning("%s received again: exiting now, shutdown left unfinished", sig.name)
            main.cancel()
            # The unwinding itself may hang (an executor thread, a task that ignores
            # cancellation): a thread, since the loop may be the thing that is stuck.
            timer = threading.Timer(FORCED_EXIT_S, _hard_exit, (code,))
            timer.daemon = True  # never what keeps the process alive
            timer.start()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    sidecar = Sidecar(settings)
    try:
        await _run(sidecar, stop)
    except asyncio.CancelledError:
        if forced:
            return forced[0]
        raise
    return 0


async def _run(sidecar: Sidecar, stop: asyncio.Event) -> None:
    starting = asyncio.create_task(sidecar.start(), name="sidecar start")
    stopping = asyncio.create_task(stop.wait(), name="stop signal")
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a failed start raises here, after aclose below
            await stopping
            log.info("shutting down")
        else:
            log.info("stopped during start-up; shutting down")
            starting.cancel()
            await _settle(starting)
    finally:
        stopping.cancel()
        if not starting.done():
            # Cancelled from outside (a forced exit) before start-up finished.
            starting.cancel()
        await sidecar.aclose()


async def _settle(starting: asyncio.Task[None]) -> None:
    """Let a cancelled start unwind, bounded; an error it raised meanwhile is logged."""
    done, _ = await asyncio.wait({starting}, timeout=START_CANCEL_S)
    if not done:
        log.error("start-up did not stop within %.1f s; closing anyway", START_CANCEL_S)
    elif not starting.cancelled() and starting.exception() is not None:
        log.error("start-up failed while stopping", exc_info=starting.exception())


def _hard_exit(code: int) -> None:
    log.error("shutdown still not done %.1f s after the second signal: exiting", FORCED_EXIT_S)
    logging.shutdown()
    os._exit(code)


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
        return asyncio.run(serve(settings))
    if args.command == "ctl":
        return ctl.run(args)
    target = args.target or ctl.default_target()
    return 0 if asyncio.run(probe(target, args.timeout)) else 1


if __name__ == "__main__":
    sys.exit(main())
