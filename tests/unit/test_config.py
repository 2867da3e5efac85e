"""Settings: flags beat environment beat defaults, and bad values fail loudly at startup."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from registry import config
from registry.config import Settings


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_without_flags_or_environment() -> None:
    settings = config.from_sources(_args(), environ={})
    assert settings == Settings()
    assert settings.listen == "127.0.0.1:50051"
    assert settings.redis_url is None
    assert settings.data_dir == Path(".registry-data")


def test_environment_beats_defaults() -> None:
    settings = config.from_sources(
        _args(),
        environ={
            "REGISTRY_LISTEN": "0.0.0.0:6000",
            "REGISTRY_REDIS_URL": "redis://db:6380/0",
            "REGISTRY_DEFAULT_TTL_MS": "3000",
            "REGISTRY_METRICS_EPSILON": "0.25",
            "REGISTRY_DATA_DIR": "/var/lib/registry",
        },
    )
    assert settings.listen == "0.0.0.0:6000"
    assert settings.redis_url == "redis://db:6380/0"
    assert settings.default_ttl_ms == 3000
    assert settings.metrics_epsilon == 0.25
    assert settings.data_dir == Path("/var/lib/registry")


def test_flags_beat_environment() -> None:
    settings = config.from_sources(
        _args("--listen", "127.0.0.1:7000", "--default-ttl-ms", "4000"),
        environ={"REGISTRY_LISTEN": "0.0.0.0:6000", "REGISTRY_DEFAULT_TTL_MS": "3000"},
    )
    assert settings.listen == "127.0.0.1:7000"
    assert settings.default_ttl_ms == 4000


def test_empty_environment_value_means_unset() -> None:
    settings = config.from_sources(_args(), environ={"REGISTRY_REDIS_URL": ""})
    assert settings.redis_url is None


def test_unrelated_environment_is_ignored() -> None:
    settings = config.from_sources(_args(), environ={"LISTEN": "x", "REGISTRY_NOPE": "1"})
    assert settings == Settings()


def test_parse_reads_flags() -> None:
    settings = config.parse(["--namespace", "blue", "--log-format", "json"])
    assert settings.namespace == "blue"
    assert settings.log_format == "json"


def test_heartbeat_interval_is_a_third_of_the_ttl() -> None:
    assert Settings(default_ttl_ms=9_000).heartbeat_interval_ms == 3_000
    assert Settings(min_ttl_ms=1, default_ttl_ms=30).heartbeat_interval_ms == 100


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.listen = "0.0.0.0:1"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REGISTRY_DEFAULT_TTL_MS": "ten"}, "invalid literal"),
        ({"REGISTRY_METRICS_EPSILON": "much"}, "could not convert"),
        ({"REGISTRY_LOG_FORMAT": "xml"}, "log_format"),
        ({"REGISTRY_DEFAULT_TTL_MS": "100"}, "default_ttl_ms"),
        ({"REGISTRY_DEFAULT_TTL_MS": "4000000"}, "default_ttl_ms"),
        ({"REGISTRY_FEED_BLOCK_MS": "0"}, "feed_block_ms must be positive"),
        ({"REGISTRY_WATCH_QUEUE_MAX": "-1"}, "watch_queue_max must be positive"),
        ({"REGISTRY_METRICS_LISTEN": "localhost"}, "metrics_listen must be HOST:PORT"),
        ({"REGISTRY_TRACES_EXPORTER": "zipkin"}, "traces_exporter must be one of"),
        ({"OTEL_METRICS_EXPORTER": "jaeger"}, "metrics_exporter must be one of"),
    ],
)
def test_bad_values_raise(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config.from_sources(_args(), environ=env)


def test_bad_flag_value_raises_even_when_environment_is_good() -> None:
    with pytest.raises(ValueError, match="invalid literal"):
        config.from_sources(_args("--log-maxlen", "lots"), environ={"REGISTRY_LOG_MAXLEN": "100"})


@pytest.mark.parametrize(
    ("env", "metrics", "traces"),
    [
        ({}, "", ""),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "otlp", "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, "", "otlp"),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "none"}, "", "console"),
        ({"OTEL_METRICS_EXPORTER": "prometheus"}, "", ""),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"},
            "otlp",
            "",
        ),
        ({"OTEL_TRACES_EXPORTER": "otlp", "REGISTRY_TRACES_EXPORTER": "console"}, "", "console"),
    ],
)
def test_exporters_follow_the_standard_otel_variables(
    env: dict[str, str], metrics: str, traces: str
) -> None:
    settings = config.from_sources(_args(), environ=env)
    assert (settings.metrics_exporter, settings.traces_exporter) == (metrics, traces)


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [
        f.name
        for f in fields(Settings)
        if f"| `--{f.name.replace('_', '-')}` | `REGISTRY_{f.name.upper()}` |" not in readme
    ]
    assert not missing, f"README's configuration table lacks {missing}"


def test_the_readme_table_is_the_generated_one() -> None:
    """Defaults and meanings come from Settings; ``python tools/config_table.py`` writes them."""
    script = Path(__file__).resolve().parents[2] / "tools" / "config_table.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
