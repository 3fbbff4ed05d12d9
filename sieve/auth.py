"""Who may call: bearer tokens checked by a ``grpc.aio`` server interceptor, and
what each caller may call; per-caller rate limits (``sieve/ratelimit.py``).

A call's ``authorization`` metadata carries ``Bearer <token>``. The token is
either a static API key, stored in config only as its SHA-256 (compared in
constant time), or a JWT verified against a configured public key or JWKS file
(signature, issuer, audience, expiry and not-before with a clock-skew leeway;
PyJWT). No valid credential: UNAUTHENTICATED. A caller not allowed the method,
or not allowed ``debug`` on a Rank: PERMISSION_DENIED. Health checks and
reflection stay open (``open_methods``). A token is never logged: messages name
the caller (the key's name, the JWT's subject) or say what was wrong.

The interceptor wraps the method's handler, so the caller it found is set in a
context variable (``current_caller``) for the handler, which runs in the same
task (the ranker checks ``debug`` against it; the rate limiter keys on it).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from pydantic import Field, field_validator, model_validator

from sieve.config import Frozen
from sieve.errors import ConfigError
from sieve.metrics import CALLS_BY_CALLER

log = logging.getLogger(__name__)

OPEN_METHODS = (
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
)
MAX_TOKEN = 8192
"""Longer ``authorization`` values are refused before any parsing."""


class ApiKey(Frozen):
    """A static API key: its name (the caller's identity) and the SHA-256 of the key."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    sha256: str
    """``printf %s KEY | sha256sum``: the key itself is never in config."""
    methods: tuple[str, ...] = ("Rank",)
    """Method names this caller may call (``Rank``, ``Retrieve``; ``*``: all)."""
    debug: bool = False
    """May ask for ``debug`` on a Rank."""

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("must be 64 lowercase hex digits (the key's SHA-256)")
        return v


class JwtConfig(Frozen):
    """JWTs signed by an issuer whose public key (or JWKS) is in a file."""

    public_key_file: str = ""
    """PEM public key (RSA, EC or Ed25519)."""
    jwks_file: str = ""
    """A JWKS document (``{"keys": [...]}``); the token's ``kid`` picks the key."""
    issuer: str
    audience: str
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    leeway_s: float = Field(30.0, ge=0.0, le=600.0)
    """Clock skew allowed on ``exp`` and ``nbf``."""
    methods_claim: str = "sieve_methods"
    """A claim listing the methods the subject may call; absent: ``default_methods``."""
    debug_claim: str = "sieve_debug"
    """A boolean claim: the subject may ask for ``debug``."""
    default_methods: tuple[str, ...] = ("Rank",)

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtConfig:
        if bool(self.public_key_file) == bool(self.jwks_file):
            raise ValueError("jwt needs exactly one of public_key_file and jwks_file")
        return self


class AuthConfig(Frozen):
    """``[ranker.auth]`` / ``[candidate.auth]``: off (the embedded default) or
    every call but ``open_methods`` needs a valid bearer token."""

    required: bool = False
    api_keys: tuple[ApiKey, ...] = ()
    jwt: JwtConfig | None = None
    open_methods: tuple[str, ...] = OPEN_METHODS
    """Full method paths callable without a token (health, reflection)."""

    @model_validator(mode="after")
    def _has_credentials(self) -> AuthConfig:
        if self.required and not self.api_keys and self.jwt is None:
            raise ValueError("auth.required needs api_keys or jwt (nobody could call)")
        names = [k.name for k in self.api_keys]
        if len(set(names)) != len(names):
            raise ValueError("auth.api_keys names must be unique")
        return self


@dataclass(frozen=True)
class Caller:
    """Who made the current call: ``key:<name>``, ``jwt:<subject>``, or, without
    auth, the client certificate's CN (``cn:<name>``) or the peer's address."""

    identity: str
    methods: frozenset[str]
    debug: bool

    def may(self, method: str) -> bool:
        return "*" in self.methods or method in self.methods

    @property
    def label(self) -> str:
        """The caller as a metric label: authenticated identities (a bounded set:
        the keys, the JWT subjects); ``anonymous`` for the rest (peers, CNs)."""
        return self.identity if self.identity.startswith(("key:", "jwt:")) else "anonymous"


ANONYMOUS = Caller("anonymous", frozenset({"*"}), True)
_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("sieve_caller", default=ANONYMOUS)


def current_caller() -> Caller:
    """The caller of the call being handled (``ANONYMOUS`` without auth)."""
    return _CALLER.get()


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _unauth(message: str) -> Refused:
    return Refused(grpc.StatusCode.UNAUTHENTICATED, message)


class Authenticator:
    """Checks one call's metadata against ``AuthConfig``.

    Raises:
        ConfigError: at construction, when a key file is unreadable.
    """

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._keys = [(k, bytes.fromhex(k.sha256)) for k in config.api_keys]
        self._jwt_key: Any = None
        self._jwks: dict[str, Any] = {}
        jwt_cfg = config.jwt
        if jwt_cfg is not None:
            import jwt

            try:
                if jwt_cfg.public_key_file:
                    self._jwt_key = Path(jwt_cfg.public_key_file).read_text()
                else:
                    doc = json.loads(Path(jwt_cfg.jwks_file).read_text())
                    for jwk in jwt.PyJWKSet.from_dict(doc).keys:
                        self._jwks[jwk.key_id or ""] = jwk.key
            except (OSError, ValueError, jwt.PyJWTError) as e:
                raise ConfigError(f"auth.jwt: cannot read its key: {e}") from e

    def authenticate(self, metadata: dict[str, str]) -> Caller:
        """The caller the ``authorization`` metadata proves.

        Raises:
            Refused: UNAUTHENTICATED, saying what was wrong (never the token).
        """
        raw = metadata.get("authorization")
        if raw is None:
            raise _unauth("no authorization metadata: send 'authorization: Bearer <token>'")
        if len(raw) > MAX_TOKEN:
            raise _unauth(f"authorization metadata longer than {MAX_TOKEN} characters")
        scheme, _, token = raw.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauth("authorization must be 'Bearer <token>'")
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for key, want in self._keys:  # every key compared: the time does not say which matched
            if hmac.compare_digest(digest, want):
                found = key
        if found is not None:
            return Caller(f"key:{found.name}", frozenset(found.methods), found.debug)
        if self.config.jwt is not None and token.count(".") == 2:
            return self._jwt_caller(token)
        raise _unauth("the bearer token is not a known API key or a valid JWT")

    def _jwt_caller(self, token: str) -> Caller:
        import jwt

        cfg = self.config.jwt
        assert cfg is not None
        try:
            key = self._jwt_key
            if key is None:
                kid = jwt.get_unverified_header(token).get("kid") or ""
                key = self._jwks.get(kid)
                if key is None:
                    raise _unauth(f"JWT key id {kid[:40]!r} is not in the JWKS")
            claims = jwt.decode(
                token,
                key,
                algorithms=list(cfg.algorithms),
                audience=cfg.audience,
                issuer=cfg.issuer,
                leeway=cfg.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise _unauth("the JWT has expired") from None
        except jwt.InvalidAudienceError:
            raise _unauth(f"the JWT is not for audience {cfg.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise _unauth(f"the JWT is not from issuer {cfg.issuer!r}") from None
        except jwt.PyJWTError as e:
            raise _unauth(f"the JWT is not valid: {type(e).__name__}") from None
        methods = claims.get(cfg.methods_claim, list(cfg.default_methods))
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise _unauth(f"the JWT's {cfg.methods_claim} is not a list of method names")
        subject = str(claims["sub"])[:128]
        return Caller(f"jwt:{subject}", frozenset(methods), claims.get(cfg.debug_claim) is True)


Check = Callable[[Caller, str], Awaitable[None]]
"""A further check of an authenticated call (the rate limiter), given the caller
and the method name; raises ``Refused`` (with trailing metadata where it has some)."""


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates (when ``auth.required``), authorizes the method, runs the
    ``checks`` (rate limits), then hands the call on with its caller set."""

    def __init__(
        self, auth: AuthConfig, checks: tuple[Check, ...] = (), service: str = "service"
    ) -> None:
        self.auth = auth
        self.service = service
        self.authenticator = Authenticator(auth) if auth.required else None
        self.checks = checks

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method_path = details.method  # type: ignore[attr-defined]
        if handler is None or handler.unary_unary is None or method_path in self.auth.open_methods:
            return handler
        method = method_path.rsplit("/", 1)[-1]
        pairs = details.invocation_metadata or ()  # type: ignore[attr-defined]
        metadata = {k.lower(): v for k, v in pairs if isinstance(v, str)}
        behavior = handler.unary_unary

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            caller: Caller | None = None
            try:
                caller = self._caller(metadata, context)
                if not caller.may(method):
                    raise Refused(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"caller {caller.identity} may not call {method} "
                        f"(allowed: {sorted(caller.methods)})",
                    )
                for check in self.checks:
                    await check(caller, method)
            except Refused as e:
                who = caller.label if caller is not None else "unauthenticated"
                CALLS_BY_CALLER.labels(self.service, who, e.code.name).inc()
                await context.abort(e.code, str(e), getattr(e, "trailing_metadata", ()))
            assert caller is not None  # the refusals above abort
            token = _CALLER.set(caller)
            try:
                return await behavior(request, context)
            finally:
                _CALLER.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _caller(self, metadata: dict[str, str], context: grpc.aio.ServicerContext) -> Caller:
        if self.authenticator is not None:
            return self.authenticator.authenticate(metadata)
        # no auth: an identity for the rate limits (a client certificate's CN, else the peer)
        cn = (context.auth_context() or {}).get("x509_common_name")
        if cn:
            return Caller(f"cn:{cn[0].decode(errors='replace')}", ANONYMOUS.methods, True)
        peer = context.peer() or "unknown"
        host = peer.rsplit(":", 1)[0] if ":" in peer else peer
        return Caller(f"peer:{host}", ANONYMOUS.methods, True)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


class TokenFile:
    """A client's bearer token from a file, re-read when the file changes (a
    rotated JWT needs no restart); an empty path sends none."""

    def __init__(self, path: str) -> None:
        self.path = Path(path) if path else None
        self._stamp: tuple[int, int] | None = None
        self._metadata: tuple[tuple[str, str], ...] | None = None

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """``authorization`` metadata for the next call (None: no token).

        Raises:
            ConfigError: the file cannot be read or is empty.
        """
        if self.path is None:
            return None
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                token = self.path.read_text().strip()
                if not token:
                    raise ConfigError(f"candidate_token_file {self.path} is empty")
                self._metadata, self._stamp = bearer(token), stamp
        except OSError as e:
            raise ConfigError(f"candidate_token_file {self.path}: {e}") from e
        return self._metadata
