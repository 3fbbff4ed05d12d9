"""Fuzzing the ``authorization`` metadata of a candidate service that requires a
token: whatever a client sends, the answer is OK (a real key), UNAUTHENTICATED or
PERMISSION_DENIED (or gRPC's own RESOURCE_EXHAUSTED for metadata past its 8 KiB
limit), never INTERNAL or UNKNOWN, and the token is never echoed.

Each example is a batch of calls sent concurrently; 1,000 calls in all (on top of
the RPC fuzz suite's 10,000)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from candidate.config import CandidateConfig
from candidate.service import create_server as create_candidate
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from sieve.auth import ApiKey, AuthConfig, JwtConfig
from tests.fuzz.conftest import FUZZ

KEY = "fuzz-key-" + "k" * 32
BATCH = 50
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
SEEN: Counter[str] = Counter()

PEM = """-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=
-----END PUBLIC KEY-----
"""


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)
jwt_like = st.builds(
    lambda h, p, s: ".".join(_b64(x) for x in (h, p, s)),
    st.one_of(
        st.binary(max_size=60),
        st.sampled_from(
            [
                json.dumps({"alg": a, "typ": "JWT", "kid": "x"}).encode()
                for a in ("none", "HS256", "RS256", "EdDSA", "ES512", "")
            ]  # fmt: skip
        ),
    ),
    st.one_of(
        st.binary(max_size=80),
        st.builds(
            lambda d: json.dumps(d).encode(),
            st.dictionaries(
                st.sampled_from(["iss", "aud", "sub", "exp", "nbf", "sieve_methods"]),
                st.one_of(st.integers(-(2**70), 2**70), printable, st.lists(printable, max_size=3)),
            ),
        ),
    ),
    st.binary(max_size=80),
)
token = st.one_of(
    printable,
    jwt_like,
    st.just(KEY),
    st.builds(lambda s: KEY + s, printable),
    st.builds(lambda n: "A" * n, st.integers(0, 10_000)),
)
authorization = st.one_of(
    printable,
    st.builds(lambda t: f"Bearer {t}", token),
    st.builds(lambda sp, t: f"bEaReR{sp}{t}", st.sampled_from(["", " ", "  ", "   "]), token),
    st.builds(lambda t: f"Basic {t}", token),
)
metadata = st.one_of(
    st.builds(lambda v: (("authorization", v),), authorization),
    st.builds(
        lambda a, b: (("authorization", a), ("authorization", b)), authorization, authorization
    ),
    st.builds(lambda b: (("authorization-bin", b),), st.binary(max_size=100)),
    st.just(()),
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def guarded(
    artifacts_root: Path,
    tmp_path_factory: pytest_asyncio.fixture,  # type: ignore[valid-type]
) -> AsyncIterator[str]:
    tmp = tmp_path_factory.mktemp("fuzz_auth")  # type: ignore[attr-defined]
    (tmp / "k.pem").write_text(PEM)
    auth = AuthConfig(
        required=True,
        api_keys=(
            ApiKey(
                name="f", sha256=hashlib.sha256(KEY.encode()).hexdigest(), methods=("Retrieve",)
            ),
        ),  # fmt: skip
        jwt=JwtConfig(public_key_file=str(tmp / "k.pem"), issuer="i", audience="a"),
    )
    server, _ = await create_candidate(CandidateConfig(port=0, auth=auth), artifacts_root)
    yield f"127.0.0.1:{server.port}"
    await server.stop(0)
    print(f"\nauth fuzz: {sum(SEEN.values())} calls, {dict(SEEN)}")


@settings(FUZZ, max_examples=20)
@given(batch=st.lists(metadata, min_size=BATCH, max_size=BATCH))
async def test_fuzz_authorization_metadata(
    guarded: str, batch: list[tuple[tuple[str, object], ...]]
) -> None:
    async with grpc.aio.insecure_channel(guarded) as ch:
        stub = sieve_pb2_grpc.CandidateServiceStub(ch)
        req = sieve_pb2.RetrieveRequest(user_id=1, k=3)

        async def one(md: tuple[tuple[str, object], ...]) -> tuple[grpc.StatusCode, str]:
            try:
                await stub.Retrieve(req, timeout=30, metadata=md)  # type: ignore[arg-type]
                return grpc.StatusCode.OK, ""
            except grpc.aio.AioRpcError as e:
                return e.code(), e.details() or ""

        answers = await asyncio.gather(*(one(md) for md in batch))
    for md, (code, details) in zip(batch, answers, strict=True):
        SEEN[code.name] += 1
        # gRPC itself refuses metadata past its 8 KiB limit, before any of our code
        too_big = code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata size" in details
        assert code in ALLOWED or too_big, (md, code, details)
        values = [v for k, v in md if k == "authorization" and isinstance(v, str)]
        for value in values:  # a token is never echoed back
            secret = value.strip().partition(" ")[2].strip()
            assert len(secret) < 12 or secret not in details, (md, details)
        if code == grpc.StatusCode.OK:  # only the real key passes
            scheme, _, tok = values[-1].strip().partition(" ")
            assert scheme.lower() == "bearer" and tok.strip() == KEY, md
