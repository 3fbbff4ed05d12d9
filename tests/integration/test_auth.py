"""Caller authentication and per-caller limits on real servers: API keys stored as
hashes, JWTs signed here with keys made by ``cryptography``, permissions per
method and for ``debug``, a candidate service that needs a token from the
ranker, and token buckets in process and in a real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from candidate.config import CandidateConfig
from candidate.service import create_server as create_candidate
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker.config import RankerConfig
from ranker.service import create_server as create_ranker
from sieve.auth import ApiKey, AuthConfig, Caller, JwtConfig, bearer
from sieve.ratelimit import CallerLimit, RateLimitConfig, RateLimiter
from tests.conftest import RELAXED, STATELESS

RANK_KEY, DEBUG_KEY, BATCH_KEY = "rk-" + "a" * 40, "dk-" + "b" * 40, "bk-" + "c" * 40
ISSUER, AUDIENCE = "https://idp.example.test", "sieve"


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Keys:
    def __init__(self, tmp: Path) -> None:
        self.signer, self.rogue = _rsa(), _rsa()
        self.public_file = tmp / "issuer.pem"
        self.public_file.write_bytes(
            self.signer.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def token(self, signer: Any = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "app-1", "iat": now, "exp": now + 300}
        body.update(claims)
        return jwt.encode(body, signer or self.signer, algorithm="RS256")


def _auth(keys: Keys, *methods: str) -> AuthConfig:
    return AuthConfig(
        required=True,
        api_keys=(
            ApiKey(name="web", sha256=_sha(RANK_KEY), methods=methods or ("Rank",)),
            ApiKey(name="tuner", sha256=_sha(DEBUG_KEY), methods=("Rank",), debug=True),
            ApiKey(name="batch", sha256=_sha(BATCH_KEY), methods=("Rank",)),
        ),
        jwt=JwtConfig(public_key_file=str(keys.public_file), issuer=ISSUER, audience=AUDIENCE),
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("jwt"))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(
    artifacts_root: Path, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Any]]:
    """A candidate service that needs a token with Retrieve, and a ranker that needs
    one with Rank, sends its own to the candidate, and limits callers in process
    (the batch key to 3/s, burst 3)."""
    tmp = tmp_path_factory.mktemp("auth")
    token_file = tmp / "ranker.token"
    token_file.write_text(keys.token(sub="ranker", sieve_methods=["Retrieve"]) + "\n")
    cserver, _ = await create_candidate(
        CandidateConfig(port=0, auth=_auth(keys, "Retrieve")), artifacts_root
    )
    rconfig = RankerConfig(
        port=0,
        candidate_address=f"127.0.0.1:{cserver.port}",
        candidate_token_file=str(token_file),
        item_refresh_s=0,
        rerank=STATELESS,
        reliability=RELAXED,
        auth=_auth(keys),
        rate_limit=RateLimitConfig(
            enabled=True,
            rate_per_s=1000.0,
            burst=1000,
            callers={"key:batch": CallerLimit(rate_per_s=3.0, burst=3)},
        ),
    )
    rserver, _ = await create_ranker(rconfig, artifacts_root)
    yield {"ranker": f"127.0.0.1:{rserver.port}", "candidate": f"127.0.0.1:{cserver.port}"}
    await rserver.stop(0)
    await cserver.stop(0)


async def _rank(address: str, token: str | None, debug: bool = False, raw: Any = None) -> Any:
    metadata = raw if raw is not None else (bearer(token) if token is not None else None)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = sieve_pb2_grpc.RankerServiceStub(ch)
        return await stub.Rank(
            sieve_pb2.RankRequest(user_id=42, k=10, debug=debug), timeout=30, metadata=metadata
        )


async def _code(coro: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    return e.value.code(), e.value.details() or ""


async def test_no_token_or_a_bad_one_is_unauthenticated(
    stack: dict[str, Any], keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    r = stack["ranker"]
    code, msg = await _code(_rank(r, None))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in msg
    code, _ = await _code(_rank(r, None, raw=(("authorization", f"Basic {RANK_KEY}"),)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    wrong = "rk-" + "z" * 40
    code, msg = await _code(_rank(r, wrong))
    assert code == grpc.StatusCode.UNAUTHENTICATED and wrong not in msg
    assert wrong not in caplog.text  # never logged
    for bad, why in (
        (keys.token(exp=int(time.time()) - 120), "expired"),  # past the 30 s leeway
        (keys.token(aud="another-service"), "audience"),
        (keys.token(iss="https://evil.test"), "issuer"),
        (keys.token(signer=keys.rogue), "not valid"),
    ):
        code, msg = await _code(_rank(r, bad))
        assert code == grpc.StatusCode.UNAUTHENTICATED and why in msg, (why, msg)
        assert bad not in caplog.text


async def test_valid_callers_rank_and_permissions_hold(stack: dict[str, Any], keys: Keys) -> None:
    r = stack["ranker"]
    assert len((await _rank(r, RANK_KEY)).items) == 10  # via the candidate's own auth
    assert len((await _rank(r, keys.token(exp=int(time.time()) - 10))).items) == 10  # leeway
    code, msg = await _code(_rank(r, RANK_KEY, debug=True))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "key:web" in msg and "debug" in msg
    assert (await _rank(r, DEBUG_KEY, debug=True)).items[0].sources
    assert (await _rank(r, keys.token(sieve_debug=True), debug=True)).items
    code, _ = await _code(_rank(r, keys.token(sieve_methods=["Retrieve"])))
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_retrieve_needs_a_caller_allowed_it_and_health_stays_open(
    stack: dict[str, Any], keys: Keys
) -> None:
    async with grpc.aio.insecure_channel(stack["candidate"]) as ch:
        stub = sieve_pb2_grpc.CandidateServiceStub(ch)
        req = sieve_pb2.RetrieveRequest(user_id=1, k=5)
        code, msg = await _code(stub.Retrieve(req, timeout=10, metadata=bearer(keys.token())))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "Retrieve" in msg
        code, _ = await _code(stub.Retrieve(req, timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        ok = await stub.Retrieve(req, timeout=10, metadata=bearer(RANK_KEY))  # web: Retrieve here
        assert len(ok.item_ids) == 5
        health = health_pb2_grpc.HealthStub(ch)
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_noisy_caller_is_limited_and_a_quiet_one_is_not(stack: dict[str, Any]) -> None:
    r = stack["ranker"]
    async with grpc.aio.insecure_channel(r) as ch:
        stub = sieve_pb2_grpc.RankerServiceStub(ch)
        req = sieve_pb2.RankRequest(user_id=42, k=10)

        async def call(key: str) -> tuple[str, Any]:
            try:
                return "ok", await stub.Rank(req, timeout=30, metadata=bearer(key))
            except grpc.aio.AioRpcError as e:
                return e.code().name, e

        noisy = [asyncio.ensure_future(call(BATCH_KEY)) for _ in range(20)]
        quiet = [await call(RANK_KEY) for _ in range(5)]
        noisy_done = await asyncio.gather(*noisy)
    assert [c for c, _ in quiet] == ["ok"] * 5
    refused = [e for c, e in noisy_done if c == "RESOURCE_EXHAUSTED"]
    assert 15 <= len(refused) <= 17  # a burst of 3 (and a token or so refilled)
    status = rpc_status.from_call(refused[0])
    assert status is not None and "key:batch" in status.message
    from google.rpc import error_details_pb2

    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert 0 < info.retry_delay.seconds * 1e3 + info.retry_delay.nanos / 1e6 <= 1000


async def test_redis_buckets_are_shared_by_replicas(redis_server: str) -> None:
    """Two limiters (two replicas) on one Redis: one bucket per caller between them."""
    config = RateLimitConfig(
        enabled=True,
        rate_per_s=0.5,
        burst=4,
        store="redis",
        redis_url=f"redis://{redis_server}/3",
        key_prefix=f"sieve:rl:test{time.time_ns()}",
        timeout_s=1.0,
    )
    a, b = RateLimiter(config), RateLimiter(config)
    caller = Caller("key:shared", frozenset({"Rank"}), False)
    other = Caller("key:other", frozenset({"Rank"}), False)
    try:
        taken = 0
        for i in range(8):
            try:
                await (a if i % 2 else b)(caller, "Rank")
                taken += 1
            except Exception as e:  # noqa: BLE001
                assert "over its rate limit" in str(e)
        assert taken == 4  # the burst, across both replicas
        await a(other, "Rank")  # another caller's bucket is its own
    finally:
        await a.close()
        await b.close()


async def test_a_redis_that_fails_does_not_fail_the_call() -> None:
    config = RateLimitConfig(
        enabled=True, burst=1, store="redis", redis_url="redis://127.0.0.1:1/0", timeout_s=0.05
    )
    limiter = RateLimiter(config)
    try:
        for _ in range(3):
            await limiter(Caller("key:x", frozenset({"Rank"}), False), "Rank")
    finally:
        await limiter.close()


def test_auth_config_refuses_what_cannot_work(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="api_keys or jwt"):
        AuthConfig(required=True)
    with pytest.raises(ValidationError, match="64 lowercase hex"):
        ApiKey(name="x", sha256="not-a-hash")
    with pytest.raises(ValidationError, match="exactly one"):
        JwtConfig(issuer="i", audience="a")


def test_the_readme_security_config_loads(tmp_path: Path) -> None:
    """README's "Securing sieve" block is the config loader's to accept as written."""
    from app.config import load_config
    from tests.conftest import ROOT

    text = (ROOT / "README.md").read_text().split("## Securing sieve", 1)[1]
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "sieve.toml"
    path.write_text(block)
    cfg = load_config(path)
    assert cfg.ranker.auth.required and cfg.ranker.auth.jwt is not None
    assert cfg.ranker.rate_limit.callers["key:batch"].rate_per_s == 5
    assert cfg.candidate.auth.api_keys[0].methods == ("Retrieve",)
