"""One error hierarchy; each error knows its gRPC status, mapped once at the edge."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)


class SieveError(Exception):
    """Base of every error sieve raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(SieveError):
    """The caller sent something we cannot serve; the message says what."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(SieveError):
    """The caller named something we do not have."""

    code = grpc.StatusCode.NOT_FOUND


class NotReady(SieveError):
    """The service has no loaded artifact set (yet)."""

    code = grpc.StatusCode.UNAVAILABLE


class Overloaded(SieveError):
    """Too much work is queued; the caller should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(SieveError):
    """The caller is known but may not do what it asked."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ArtifactError(SieveError):
    """An artifact is missing, corrupt or does not match its manifest."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class VersionNotLoaded(SieveError):
    """The caller pinned an artifact version this service does not hold (not loaded
    yet, or already dropped); the message names the versions it holds."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ConfigError(SieveError):
    """The configuration cannot work on this machine; the message names the key."""

    code = grpc.StatusCode.FAILED_PRECONDITION


Req = TypeVar("Req")
Resp = TypeVar("Resp")


def grpc_errors(
    method: Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    """Wrap a servicer method so a ``SieveError`` becomes its status and message.

    Anything else is logged with its traceback and answered INTERNAL, without
    leaking internals to the caller.
    """

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await method(self, request, context)
        except SieveError as e:
            await context.abort(e.code, str(e))
        except Exception:
            log.exception("unhandled error in %s", method.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see server log")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper
