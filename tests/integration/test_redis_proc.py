"""The fault-injection harness itself: if it lies, every fault test above it lies too."""

from __future__ import annotations

import time

import pytest
import redis
from redis.cluster import RedisCluster

from tests.support.redis_proc import RedisProcess, RedisProcessError


def test_start_answers_ping_on_its_own_port(redis_proc: RedisProcess) -> None:
    assert redis_proc.running
    assert redis_proc.port != 6379
    assert redis_proc.url == f"redis://127.0.0.1:{redis_proc.port}/0"
    client = redis.Redis.from_url(redis_proc.url, socket_timeout=1)
    try:
        assert client.ping() is True
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
    finally:
        client.close()


def test_two_processes_do_not_share_data(redis_proc: RedisProcess) -> None:
    with RedisProcess() as other:
        assert other.port != redis_proc.port
        redis_proc.client().set("k", "1")
        assert other.client().get("k") is None


def test_restart_without_persistence_loses_data(redis_proc: RedisProcess) -> None:
    port = redis_proc.port
    redis_proc.client().set("k", "v")
    redis_proc.restart(keep_data=True)
    assert redis_proc.port == port
    assert redis_proc.client().get("k") is None


def test_kill_then_restart_with_appendonly_keeps_data() -> None:
    with RedisProcess(["--appendfsync", "always"], appendonly=True) as proc:
        proc.client().set("k", "v")
        pid = proc.pid
        proc.kill()
        assert not proc.running
        assert not proc.ping(timeout=0.2)
        proc.restart(keep_data=True)
        assert proc.pid != pid
        assert proc.client().get("k") == b"v"


def test_restart_dropping_data_starts_empty() -> None:
    with RedisProcess(["--appendfsync", "always"], appendonly=True) as proc:
        proc.client().set("k", "v")
        proc.restart(keep_data=False)
        assert proc.client().get("k") is None


def test_pause_makes_ping_time_out_and_resume_answers(redis_proc: RedisProcess) -> None:
    client = redis_proc.client(timeout=0.3)
    try:
        assert client.ping()
        redis_proc.pause()
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert time.monotonic() - started < 2.0
        redis_proc.resume()
        # The connection that timed out is discarded; a new one answers.
        assert client.ping()
    finally:
        client.close()


def test_stop_of_a_paused_server_is_prompt(redis_proc: RedisProcess) -> None:
    redis_proc.pause()
    started = time.monotonic()
    redis_proc.stop()
    assert not redis_proc.running
    assert time.monotonic() - started < redis_proc.stop_timeout


def test_close_removes_its_directory() -> None:
    proc = RedisProcess().start()
    data_dir = proc.data_dir
    assert data_dir is not None and data_dir.is_dir()
    proc.close()
    assert not proc.running
    assert not data_dir.exists()


def test_signals_to_a_dead_server_are_an_error(redis_proc: RedisProcess) -> None:
    redis_proc.kill()
    with pytest.raises(RedisProcessError, match="not running"):
        redis_proc.pause()


def test_missing_binary_names_the_package() -> None:
    with pytest.raises(RedisProcessError, match="apt-get install -y redis-server"):
        RedisProcess(binary="no-such-redis-server-binary").start()


def test_start_failure_carries_the_log() -> None:
    proc = RedisProcess(["--no-such-directive", "yes"])
    try:
        with pytest.raises(RedisProcessError, match="no-such-directive"):
            proc.start()
        assert not proc.running
    finally:
        proc.close()


def test_one_node_cluster_owns_every_slot() -> None:
    with RedisProcess(cluster=True) as proc:
        assert proc.url == f"redis://127.0.0.1:{proc.port}"
        cluster = RedisCluster.from_url(proc.url, socket_timeout=2)
        try:
            for i in range(20):  # keys spread over many slots
                cluster.set(f"key:{i}", i)
            assert cluster.get("key:7") == b"7"
        finally:
            cluster.close()


def test_namespace_is_unique(namespace: str, shared_redis: RedisProcess) -> None:
    assert namespace.startswith("t") and len(namespace) == 9
    client = shared_redis.client()
    try:
        assert client.set(f"{namespace}:k", "v", nx=True)
    finally:
        client.close()
