"""Structured logs: one JSON object per line, the request's ids on each line inside it.

``[logging]`` in ``sieve.toml``; ``sieve serve`` applies it (``configure``) before
anything else logs. With ``format = "json"`` every record is one line of JSON
(``python-json-logger``): ``time``, ``level``, ``logger``, ``message``, the fields
a call passed in ``extra``, and, inside a Rank or Retrieve, ``request_id`` (one
per call, set by the service) with ``trace_id``/``span_id`` of the current span
when tracing is on (sampled or not: a 1% sample still correlates every line).

Records are formatted and written by a listener thread (``QueueHandler`` ->
``QueueListener``): the event loop pays for building the record and a queue put,
never for the JSON encoding or the write to a slow pipe.

One ``request`` line for a share (``request_sample``) of the calls, drawn at
random. A user id reaches a line only through ``user_ref``: by default an
HMAC-SHA256 of the id under a key (from ``user_id_key_file``, so replicas and
restarts agree, or drawn at start), since a plain hash of a small integer is
reversed by hashing every integer; ``plain`` or ``omit`` when configured.
"""

from __future__ import annotations

import atexit
import contextvars
import hashlib
import hmac
import logging
import logging.handlers
import queue
import random
import secrets
import sys
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import Field

from sieve.config import Frozen
from sieve.errors import ConfigError
from sieve.metrics import _trace_api

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("sieve_request_id", default="")
"""The id of the call this task serves (empty outside one)."""

REQUEST_ID_KEY = "x-sieve-request-id"
"""Metadata carrying a Rank's request id to the candidate service."""

OUR_LOGGERS = ("sieve", "candidate", "ranker", "features", "app")


class LoggingConfig(Frozen):
    """``[logging]``: how ``sieve serve`` writes its log (stderr)."""

    format: Literal["text", "json"] = "text"
    """``json``: one JSON object per line, for a log pipeline (Loki, Elasticsearch,
    Cloud Logging); ``text``: for a person at a terminal."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """sieve's own loggers; libraries log at WARNING and above."""
    request_sample: float = Field(0.0, ge=0.0, le=1.0)
    """Share of Rank and Retrieve calls logged as one ``request`` line each (caller,
    user, k, version, rungs, stage times); 0: none."""
    user_ids: Literal["hashed", "plain", "omit"] = "hashed"
    """How a user id appears in a line: ``hashed`` (HMAC-SHA256 under the key, 16 hex
    digits), ``plain``, or ``omit``."""
    user_id_key_file: str = ""
    """The HMAC key (a file of at least 16 bytes, kept secret) for ``hashed``: the
    same key gives the same hash in every replica and after restarts. Empty: a key
    drawn at start (hashes comparable within one process's life only)."""


class ContextFilter(logging.Filter):
    """Adds ``request_id``, ``trace_id`` and ``span_id`` to a record made inside a call.
    Runs in the thread that logs (the ids live in its context), before the queue."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id:
            record.request_id = request_id
        trace = _trace_api()
        if trace is not None:
            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                record.trace_id = format(ctx.trace_id, "032x")
                record.span_id = format(ctx.span_id, "016x")
        return True


class RequestLog:
    """The sampled ``request`` lines and how user ids appear in any line."""

    def __init__(self, config: LoggingConfig, key: bytes | None = None) -> None:
        self.sample = config.request_sample
        self.user_ids = config.user_ids
        self._key = key if key is not None else secrets.token_bytes(32)
        self._log = logging.getLogger("sieve.requests")

    def user_ref(self, user_id: int) -> str | None:
        """``user_id`` as lines may carry it (None: omitted)."""
        if self.user_ids == "omit":
            return None
        if self.user_ids == "plain":
            return str(user_id)
        return hmac.new(self._key, str(user_id).encode(), hashlib.sha256).hexdigest()[:16]

    def sampled(self) -> bool:
        return self.sample > 0.0 and (self.sample >= 1.0 or random.random() < self.sample)

    def request(self, method: str, user_id: int | None, **fields: Any) -> None:
        """One ``request`` line (call it only when ``sampled()``)."""
        if user_id is not None and self.user_ids != "omit":
            fields["user"] = self.user_ref(user_id)
        fields["method"] = method
        self._log.info("request", extra=fields)


_requests = RequestLog(LoggingConfig())
_listener: logging.handlers.QueueListener | None = None


def requests() -> RequestLog:
    """The process's request log (``configure`` sets it; default: no request lines)."""
    return _requests


def new_request_id(metadata: Any = None) -> str:
    """The id of the call being handled, set as the current one: the caller's
    ``x-sieve-request-id`` when it sent a plausible one (the ranker does), else a
    fresh one (16 hex digits)."""
    request_id = ""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            if 0 < len(value) <= 64 and value.isascii() and value.isprintable():
                request_id = value
            break
    request_id = request_id or secrets.token_hex(8)
    REQUEST_ID.set(request_id)
    return request_id


def _key(config: LoggingConfig) -> bytes | None:
    if not config.user_id_key_file:
        return None
    try:
        key = Path(config.user_id_key_file).read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"logging.user_id_key_file: cannot read: {e}") from None
    if len(key) < 16:
        raise ConfigError(
            f"logging.user_id_key_file {config.user_id_key_file} holds {len(key)} bytes; "
            "a key needs at least 16 (e.g. `openssl rand -hex 32 > FILE`)"
        )
    return key


def configure(config: LoggingConfig, stream: IO[str] | None = None) -> None:
    """Route every record through a queue to one handler on ``stream`` (stderr),
    formatted as ``config`` says; set the request log. Idempotent (the last call wins).

    Raises:
        ConfigError: the user id key file is unreadable or too short.
    """
    global _requests, _listener
    key = _key(config)
    handler = logging.StreamHandler(stream or sys.stderr)
    if config.format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                json_ensure_ascii=False,
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    to_queue = logging.handlers.QueueHandler(q)
    to_queue.addFilter(ContextFilter())
    if _listener is not None:
        _listener.stop()
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(to_queue)
    root.setLevel(logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(config.level)
    _listener = logging.handlers.QueueListener(q, handler, respect_handler_level=False)
    _listener.start()
    _requests = RequestLog(config, key)


@atexit.register
def _flush() -> None:
    """Write what is queued before the process ends."""
    if _listener is not None:
        _listener.stop()
