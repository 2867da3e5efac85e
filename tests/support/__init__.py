"""Helpers shared by the test suites: real processes, never mocks of them."""

from __future__ import annotations

from tests.support.redis_proc import RedisProcess, RedisProcessError

__all__ = ["RedisProcess", "RedisProcessError"]
