"""``[logging]``: JSON lines with the request's ids, written off the caller's thread;
user ids hashed under a key; the request sample."""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sieve import logs
from sieve.errors import ConfigError
from sieve.logs import LoggingConfig


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {n: logging.getLogger(n).level for n in logs.OUR_LOGGERS}
    yield
    if logs._listener is not None:
        logs._listener.stop()
        logs._listener = None
    logs._requests = logs.RequestLog(LoggingConfig())
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    for n, lv in levels.items():
        logging.getLogger(n).setLevel(lv)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    assert logs._listener is not None
    logs._listener.stop()  # drains the queue
    logs._listener = None
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_request_id_inside_a_call_only(restore_logging: None) -> None:
    out = io.StringIO()
    logs.configure(LoggingConfig(format="json"), out)
    log = logging.getLogger("ranker.test")
    log.info("outside")

    async def call(n: int) -> str:
        request_id = logs.new_request_id()
        await asyncio.sleep(0)
        log.warning("inside %d", n, extra={"n": n})
        return request_id

    async def both() -> list[str]:
        return list(await asyncio.gather(call(1), call(2)))

    ids = asyncio.run(both())
    logging.getLogger("somelibrary").info("libraries log at WARNING and above")
    lines = _lines(out)
    assert [r["message"] for r in lines] == ["outside", "inside 1", "inside 2"]
    assert "request_id" not in lines[0]
    assert [r["request_id"] for r in lines[1:]] == ids and ids[0] != ids[1]
    assert lines[1]["n"] == 1 and lines[1]["level"] == "WARNING"
    assert lines[1]["logger"] == "ranker.test" and lines[1]["time"]


def test_a_callers_request_id_is_taken_when_plausible() -> None:
    def run(metadata: object) -> str:
        return contextvars.copy_context().run(logs.new_request_id, metadata)

    assert run([(logs.REQUEST_ID_KEY, "abc123")]) == "abc123"
    for bad in ("", "x" * 65, "caf\u00e9", "a\nb"):
        made = run([(logs.REQUEST_ID_KEY, bad)])
        assert made != bad and len(made) == 16
    assert run([(logs.REQUEST_ID_KEY + "-bin", b"\x00")]) != ""


def test_records_are_written_by_the_listener_thread(restore_logging: None) -> None:
    writers: list[str] = []

    class Recording(io.StringIO):
        def write(self, s: str) -> int:
            writers.append(threading.current_thread().name)
            return super().write(s)

    out = Recording()
    logs.configure(LoggingConfig(format="json"), out)
    logging.getLogger("sieve.test").info("one")
    _lines(out)
    assert writers and threading.main_thread().name not in writers


def test_user_ids(tmp_path: Path) -> None:
    key = b"k" * 32
    hashed = logs.RequestLog(LoggingConfig(), key)
    assert hashed.user_ref(42) == hmac.new(key, b"42", hashlib.sha256).hexdigest()[:16]
    assert hashed.user_ref(42) != logs.RequestLog(LoggingConfig(), b"j" * 32).user_ref(42)
    assert logs.RequestLog(LoggingConfig(user_ids="plain")).user_ref(42) == "42"
    assert logs.RequestLog(LoggingConfig(user_ids="omit")).user_ref(42) is None
    # without a key file, one drawn at start: stable within the process
    drawn = logs.RequestLog(LoggingConfig())
    assert drawn.user_ref(7) == drawn.user_ref(7) != hashed.user_ref(7)


def test_a_short_or_missing_key_file_is_refused(tmp_path: Path, restore_logging: None) -> None:
    short = tmp_path / "short.key"
    short.write_text("abc")
    with pytest.raises(ConfigError, match="at least 16"):
        logs.configure(LoggingConfig(user_id_key_file=str(short)), io.StringIO())
    with pytest.raises(ConfigError, match="cannot read"):
        logs.configure(LoggingConfig(user_id_key_file=str(tmp_path / "none")), io.StringIO())


def test_request_lines_are_sampled(restore_logging: None) -> None:
    out = io.StringIO()
    logs.configure(LoggingConfig(format="json", request_sample=0.25, user_ids="omit"), out)
    request_log = logs.requests()
    n = sum(request_log.sampled() for _ in range(20_000))
    assert 4_400 < n < 5_600  # 5,000 expected; 8 standard deviations either side
    request_log.request("Rank", 42, k=50)
    (line,) = _lines(out)
    assert line["method"] == "Rank" and line["k"] == 50 and "user" not in line
    assert not logs.RequestLog(LoggingConfig()).sampled()  # the default: none
