"""A private ``redis-server`` child process, so one command runs the sidecar without a Redis.

It listens only on a Unix socket inside the data directory (``--port 0``), so nothing is
exposed on the network, and keeps an append-only file there so registrations survive a
restart of the sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

log = logging.getLogger(__name__)

INSTALL_HINT = "apt-get install -y redis-server"
SOCKET_NAME = "redis.sock"
LOG_NAME = "redis.log"
# sockaddr_un.sun_path holds 108 bytes on Linux and 104 on macOS, including the final NUL.
MAX_SOCKET_PATH_BYTES = 103 if sys.platform == "darwin" else 107
_PING_TIMEOUT_S = 0.5
_LOG_TAIL_LINES = 20


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be started; the message says what to do."""


class _ServerExited(Exception):
    """Raised inside the readiness loop so tenacity stops retrying a dead process."""


class EmbeddedRedis:
    """Owns one ``redis-server`` child process for the lifetime of an ``async with`` block."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        binary: str = "redis-server",
        *,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._data_dir = Path(data_dir).expanduser().absolute()
        self._binary = binary
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._extra_args = tuple(extra_args)
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def socket_path(self) -> Path:
        return self._data_dir / SOCKET_NAME

    @property
    def log_path(self) -> Path:
        return self._data_dir / LOG_NAME

    @property
    def url(self) -> str:
        """``unix://`` URL of the server, for ``redis.asyncio.from_url`` and Settings."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        """Process id while the child runs, for logs and tests."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Return once the child answers PING; on any failure nothing is left running."""
        if self._proc is not None:
            raise EmbeddedRedisError("embedded redis-server is already started")
        executable = self._resolve_binary()
        self._check_socket_path()
        self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        await self._refuse_if_in_use()

        argv = [
            executable,
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self._data_dir),
            "--appendonly", "yes",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
            *self._extra_args,
        ]  # fmt: skip
        log.info("starting embedded redis-server in %s", self._data_dir)
        # Errors printed before redis opens its log file (bad arguments) land in the log too.
        with self.log_path.open("ab") as early_log:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=early_log,
                    stderr=early_log,
                    # Own process group: Ctrl-C in a terminal reaches only the sidecar,
                    # which then shuts Redis down after its own writes have drained.
                    process_group=0,
                )
            except OSError as exc:
                raise EmbeddedRedisError(
                    f"cannot execute {executable!r}: {exc}; install Redis with `{INSTALL_HINT}`"
                ) from exc
        try:
            await self._wait_ready()
        except BaseException:
            await self.aclose()
            raise
        log.info("embedded redis-server ready (pid %s) at %s", self.pid, self.url)

    async def aclose(self) -> None:
        """SIGTERM (Redis flushes its append-only file), then SIGKILL after ``stop_timeout``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            code = await asyncio.wait_for(proc.wait(), self._stop_timeout)
        except TimeoutError:
            log.warning(
                "embedded redis-server (pid %s) ignored SIGTERM for %.1fs; killing it",
                proc.pid,
                self._stop_timeout,
            )
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            code = await proc.wait()
        except BaseException:
            # Cancelled while waiting: never leave an orphan holding the data directory.
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            raise
        if code != 0:
            log.warning("embedded redis-server exited with status %s", code)

    def _resolve_binary(self) -> str:
        found = shutil.which(self._binary)
        if found is None:
            raise EmbeddedRedisError(
                f"redis-server executable {self._binary!r} not found; install it with "
                f"`{INSTALL_HINT}` (or `sudo {INSTALL_HINT}`), or pass --redis-url to use "
                "an existing Redis"
            )
        return found

    def _check_socket_path(self) -> None:
        size = len(os.fsencode(str(self.socket_path)))
        if size > MAX_SOCKET_PATH_BYTES:
            raise EmbeddedRedisError(
                f"Unix socket path {self.socket_path} is {size} bytes, over the "
                f"{MAX_SOCKET_PATH_BYTES}-byte limit of the operating system; "
                "choose a shorter --data-dir"
            )

    def _client(self) -> aioredis.Redis:
        # No client-side retries: the readiness loop below is the only retry policy.
        return aioredis.Redis(
            unix_socket_path=str(self.socket_path),
            socket_timeout=_PING_TIMEOUT_S,
            socket_connect_timeout=_PING_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )

    async def _refuse_if_in_use(self) -> None:
        """redis-server unlinks a stale socket on start; a live one means a second owner.

        Two servers on one append-only file would corrupt it, and an orphan left by a
        sidecar that was SIGKILLed would otherwise be silently cut off from its socket.
        """
        if not self.socket_path.exists():
            return
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket_path)), _PING_TIMEOUT_S
            )
        except (ConnectionRefusedError, FileNotFoundError):
            return  # stale socket left by a crash; redis-server replaces it
        except (OSError, TimeoutError) as exc:
            raise EmbeddedRedisError(
                f"cannot tell whether {self.socket_path} is in use ({exc!r}); "
                "stop whatever owns it or choose another --data-dir"
            ) from exc
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        pid: object = "?"
        client = self._client()
        try:
            pid = (await client.info("server")).get("process_id", "?")
        except (RedisError, OSError):
            pass  # busy loading or paused: still in use, only the pid is unknown
        finally:
            await client.aclose()
        raise EmbeddedRedisError(
            f"a process (redis-server pid {pid}) already listens on {self.socket_path}; "
            "stop it or choose another --data-dir"
        )

    async def _wait_ready(self) -> None:
        proc = self._proc
        assert proc is not None
        client = self._client()
        retrying = AsyncRetrying(
            stop=stop_after_delay(self._start_timeout),
            wait=wait_exponential(multiplier=0.01, max=0.2),
            retry=retry_if_exception_type((RedisError, OSError)),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if proc.returncode is not None:
                        raise _ServerExited
                    await client.ping()
        except _ServerExited:
            raise EmbeddedRedisError(
                f"redis-server exited with status {proc.returncode} during startup; "
                f"last lines of {self.log_path}:\n{self._log_tail()}"
            ) from None
        except (RedisError, OSError) as exc:
            raise EmbeddedRedisError(
                f"redis-server did not answer PING on {self.socket_path} within "
                f"{self._start_timeout:g}s ({exc}); last lines of {self.log_path}:\n"
                f"{self._log_tail()}"
            ) from exc
        finally:
            await client.aclose()

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as fh:
                lines = _tail(fh, _LOG_TAIL_LINES)
        except OSError as exc:
            return f"  (log unreadable: {exc})"
        return "\n".join("  " + line for line in lines) or "  (log is empty)"


def _tail(fh: IO[bytes], count: int, block: int = 8192) -> list[str]:
    """Last ``count`` lines without reading a large append-only log into memory."""
    fh.seek(0, os.SEEK_END)
    fh.seek(max(fh.tell() - block, 0))
    text = fh.read().decode(errors="replace")
    return text.splitlines()[-count:]
