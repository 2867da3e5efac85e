"""redis+sentinel:// URLs, parsed once for the async pool, the feed and the watchdog."""

from __future__ import annotations

import pytest

from registry.gateway import parse_sentinel_url


def test_hosts_service_db_and_password() -> None:
    assert parse_sentinel_url("redis+sentinel://:s3cret@10.0.0.1:26380,sentinel-b/mymaster/2") == (
        [("10.0.0.1", 26380), ("sentinel-b", 26379)],
        "mymaster",
        2,
        "s3cret",
    )
    assert parse_sentinel_url("redis+sentinel://127.0.0.1:5000/primary") == (
        [("127.0.0.1", 5000)],
        "primary",
        0,
        None,
    )


def test_a_service_name_is_required() -> None:
    with pytest.raises(ValueError, match="service name"):
        parse_sentinel_url("redis+sentinel://127.0.0.1:26379")
