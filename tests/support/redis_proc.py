"""A real ``redis-server`` on a free loopback port, which tests can kill, pause and restart.

Fault tests need a Redis they own: one they may SIGKILL or SIGSTOP without disturbing
other tests or any Redis already running on the machine (never port 6379).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

INSTALL_HINT = "apt-get install -y redis-server"
CLUSTER_SLOTS = 16384

_live: weakref.WeakSet[RedisProcess] = weakref.WeakSet()


class RedisProcessError(RuntimeError):
    """The test Redis could not be started or stopped; the message carries its log."""


def free_port() -> int:
    """A port the kernel just handed out; a collision on start is retried with a new one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """One ``redis-server`` child bound to 127.0.0.1 with its own temporary directory.

    Defaults keep nothing on disk (``--save "" --appendonly no``), so a restart loses the
    data unless ``appendonly=True`` (or ``extra_args``) says otherwise. ``cluster=True``
    starts a one-node cluster that owns every slot.
    """

    def __init__(
        self,
        extra_args: Sequence[str] = (),
        *,
        appendonly: bool = False,
        cluster: bool = False,
        binary: str = "redis-server",
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.extra_args = tuple(extra_args)
        self.appendonly = appendonly
        self.cluster = cluster
        self.binary = binary
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._port: int | None = None
        self._bus_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisProcessError("RedisProcess has not been started")
        return self._port

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        """``redis://`` URL; a cluster has only database 0, so its URL names none."""
        base = f"redis://{self.host}:{self.port}"
        return base if self.cluster else f"{base}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        if self.data_dir is None:
            raise RedisProcessError("RedisProcess has not been started")
        return self.data_dir / "redis.log"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Start the server and return once it answers PING (and, for a cluster, is ok)."""
        if self.running:
            raise RedisProcessError(f"redis-server already running on port {self.port}")
        if shutil.which(self.binary) is None:
            raise RedisProcessError(f"{self.binary!r} not found; install it with `{INSTALL_HINT}`")
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fixed_port = self._port is not None
        attempts = 1 if fixed_port else 3
        for attempt in range(attempts):
            if not fixed_port:
                self._port = free_port()
                # Named explicitly: the default (port + 10000) overflows for high ports.
                self._bus_port = free_port() if self.cluster else None
            try:
                self._spawn_and_wait()
                break
            except RedisProcessError:
                if attempt + 1 == attempts or "Address already in use" not in self.log_tail():
                    raise
                log.info("port %s was taken meanwhile; trying another", self._port)
        _live.add(self)
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout``. A paused server is resumed first."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        try:
            proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("redis-server on port %s ignored SIGTERM; killing it", self._port)
            self.kill()

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to flush anything."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the socket stays open but nothing answers, like a hung Redis."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)

    def restart(self, keep_data: bool = True) -> Self:
        """Stop (if running) and start again on the same port.

        ``keep_data`` keeps the directory; whether data survives still depends on
        persistence (``appendonly``). ``keep_data=False`` wipes it: a fresh server.
        """
        self.stop()
        if not keep_data and self.data_dir is not None:
            for child in self.data_dir.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove the directory this object created."""
        self.stop()
        _live.discard(self)
        if self._owns_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ does not run when __enter__ fails
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ clients

    def client(self, timeout: float = 1.0, **kwargs: Any) -> redis.Redis:
        """A sync client with a short timeout and no retries, so faults surface at once."""
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        return redis.Redis(
            host=self.host,
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            **kwargs,
        )

    def ping(self, timeout: float = 1.0) -> bool:
        """True when the server answers within ``timeout``; never raises."""
        client = self.client(timeout=timeout)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, RedisProcessError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ internals

    def _argv(self) -> list[str]:
        assert self.data_dir is not None
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.cluster:
            argv += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(self._bus_port),
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
        return [*argv, *self.extra_args]

    def _spawn_and_wait(self) -> None:
        with self.log_path.open("ab") as early_log:
            self._proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=early_log,
                stderr=early_log,
                # Ctrl-C on pytest must not kill servers before fixtures tear them down.
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while not self.ping(timeout=0.2):
            if self._proc.poll() is not None:
                raise RedisProcessError(
                    f"redis-server on port {self._port} exited with status "
                    f"{self._proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RedisProcessError(
                    f"redis-server on port {self._port} did not answer PING within "
                    f"{self.start_timeout:g}s:\n{self.log_tail()}"
                )
            time.sleep(0.02)
        if self.cluster:
            self._own_all_slots(deadline)

    def _own_all_slots(self, deadline: float) -> None:
        client = self.client()
        try:
            info = client.execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_slots_assigned:0" in text:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, CLUSTER_SLOTS - 1)
            while "cluster_state:ok" not in text:
                if time.monotonic() > deadline:
                    raise RedisProcessError(f"cluster did not reach state ok:\n{text}")
                time.sleep(0.05)
                info = client.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
        finally:
            client.close()

    def _signal(self, signum: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise RedisProcessError(f"redis-server is not running; cannot send {signum.name}")
        self._proc.send_signal(signum)


@atexit.register
def _kill_leftovers() -> None:
    """A test run that is interrupted must not leave servers behind (SIGKILL excepted)."""
    for proc in list(_live):
        proc.close()
