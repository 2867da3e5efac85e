"""EmbeddedRedis against a real redis-server: start, persistence, clean exits, clear errors."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from registry.embedded_redis import MAX_SOCKET_PATH_BYTES, EmbeddedRedis, EmbeddedRedisError


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A short path: pytest's tmp_path can exceed the Unix socket path limit."""
    base = Path(tempfile.mkdtemp(prefix="er-"))
    try:
        yield base / "data"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _fake_server(directory: Path, body: str) -> str:
    """An executable that stands in for redis-server and misbehaves as told."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fake-redis-server"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


async def test_serves_only_a_private_unix_socket(data_dir: Path) -> None:
    async with EmbeddedRedis(data_dir) as server:
        assert server.url == f"unix://{data_dir.absolute()}/redis.sock"
        mode = stat.S_IMODE(server.socket_path.stat().st_mode)
        assert mode & 0o077 == 0, oct(mode)
        client = aioredis.from_url(server.url)
        try:
            assert await client.ping()
            assert await client.config_get("port") == {"port": "0"}
            assert await client.config_get("appendonly") == {"appendonly": "yes"}
            assert await client.config_get("save") == {"save": ""}
        finally:
            await client.aclose()
        pid = server.pid
        assert pid is not None
    assert not _alive(pid)
    assert server.pid is None
    assert not server.socket_path.exists()
    assert (data_dir / "redis.log").exists()


async def test_data_survives_a_restart(data_dir: Path) -> None:
    async with EmbeddedRedis(data_dir) as server:
        client = aioredis.from_url(server.url)
        await client.set("node:a", "1")
        await client.aclose()
    async with EmbeddedRedis(data_dir) as server:
        client = aioredis.from_url(server.url)
        try:
            assert await client.get("node:a") == b"1"
        finally:
            await client.aclose()


async def test_missing_binary_says_what_to_install(data_dir: Path) -> None:
    server = EmbeddedRedis(data_dir, binary="no-such-redis-server-binary")
    with pytest.raises(EmbeddedRedisError, match=r"apt-get install -y redis-server"):
        await server.start()
    assert not data_dir.exists()


async def test_too_long_data_dir_is_refused_before_anything_starts() -> None:
    deep = Path("/tmp") / ("x" * (MAX_SOCKET_PATH_BYTES - 10)) / "data"
    with pytest.raises(EmbeddedRedisError, match=r"shorter --data-dir"):
        await EmbeddedRedis(deep).start()
    assert not deep.parent.exists()


async def test_bad_arguments_report_the_log_tail(data_dir: Path) -> None:
    server = EmbeddedRedis(data_dir, extra_args=["--no-such-directive", "yes"])
    with pytest.raises(EmbeddedRedisError, match=r"(?s)exited with status.*no-such-directive"):
        await server.start()
    assert server.pid is None


async def test_early_exit_of_the_binary_is_reported(data_dir: Path) -> None:
    fake = _fake_server(data_dir.parent / "bin", "echo 'boom: cannot start' >&2; exit 3")
    with pytest.raises(EmbeddedRedisError, match=r"(?s)status 3.*boom: cannot start"):
        await EmbeddedRedis(data_dir, binary=fake).start()


async def test_a_server_that_never_answers_times_out_and_is_killed(data_dir: Path) -> None:
    pid_file = data_dir.parent / "fake.pid"
    fake = _fake_server(data_dir.parent / "bin", f"echo $$ > {pid_file}; exec sleep 60")
    server = EmbeddedRedis(data_dir, binary=fake, start_timeout=0.5, stop_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(EmbeddedRedisError, match=r"did not answer PING"):
        await server.start()
    assert time.monotonic() - started < 5
    assert not _alive(int(pid_file.read_text()))


async def test_sigkill_follows_an_ignored_sigterm(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = EmbeddedRedis(data_dir, stop_timeout=0.3)
    await server.start()
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    with caplog.at_level(logging.WARNING, logger="registry.embedded_redis"):
        started = time.monotonic()
        await server.aclose()
    assert time.monotonic() - started < 3
    assert not _alive(pid)
    assert "killing it" in caplog.text


async def test_a_live_server_on_the_same_directory_is_not_replaced(data_dir: Path) -> None:
    async with EmbeddedRedis(data_dir) as first:
        with pytest.raises(EmbeddedRedisError, match=rf"pid {first.pid}\) already listens"):
            await EmbeddedRedis(data_dir).start()
        client = aioredis.from_url(first.url)
        try:
            assert await client.ping()
        finally:
            await client.aclose()


async def test_a_stale_socket_after_a_crash_is_replaced(data_dir: Path) -> None:
    crashed = EmbeddedRedis(data_dir)
    await crashed.start()
    pid = crashed.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await crashed.aclose()  # reaps; the socket file stays behind
    assert crashed.socket_path.exists()
    async with EmbeddedRedis(data_dir) as server:
        client = aioredis.from_url(server.url)
        try:
            assert await client.ping()
        finally:
            await client.aclose()


async def test_aclose_is_idempotent_and_start_twice_is_an_error(data_dir: Path) -> None:
    server = EmbeddedRedis(data_dir)
    await server.aclose()  # never started: nothing to do
    await server.start()
    try:
        with pytest.raises(EmbeddedRedisError, match="already started"):
            await server.start()
    finally:
        await server.aclose()
        await server.aclose()
