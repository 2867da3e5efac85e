"""``--log-format json``: one JSON object a line, with a UTC timestamp in milliseconds."""

from __future__ import annotations

import json
import logging
from datetime import datetime

import pytest

from registry.cli import configure_logging


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    try:
        log = logging.getLogger("registry.test")
        log.info("mode %s -> %s", "NORMAL", "L2_ONLY")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        log.debug("not at INFO")
    finally:
        logging.basicConfig(force=True, handlers=[logging.NullHandler()])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "mode NORMAL -> L2_ONLY" and first["level"] == "INFO"
    assert first["logger"] == "registry.test"
    stamp = datetime.fromisoformat(first["ts"])
    assert stamp.utcoffset() is not None and first["ts"].count(".") == 1
    assert "ValueError: boom" in second["exc"]
