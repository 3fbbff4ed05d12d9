"""TLS and mutual TLS with real handshakes: certificates issued here by ``trustme``
CAs, real servers on loopback, real clients.

The candidate service alone for the handshake cases (Retrieve by user id needs
nothing else), then a ranker that reaches it over mutual TLS, and a certificate
rotated under a running server.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import trustme

from candidate.config import CandidateConfig
from candidate.service import create_server as create_candidate
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker.config import RankerConfig
from sieve.errors import ConfigError
from sieve.tls import ClientTls, ServerTls, is_loopback
from tests.conftest import RELAXED, STATELESS

RETRIEVE = sieve_pb2.RetrieveRequest(user_id=1, k=5)


def _files(tmp: Path, name: str, ca: trustme.CA, *hosts: str) -> tuple[Path, Path]:
    """A certificate for ``hosts`` signed by ``ca``: (cert chain file, key file)."""
    cert = ca.issue_cert(*hosts)
    chain, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return chain, key


def _ca_file(tmp: Path, name: str, ca: trustme.CA) -> Path:
    path = tmp / f"{name}-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


async def _retrieve(port: int, creds: grpc.ChannelCredentials) -> sieve_pb2.RetrieveResponse:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as ch:
        stub = sieve_pb2_grpc.CandidateServiceStub(ch)
        return await stub.Retrieve(RETRIEVE, timeout=10)


class Pki:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.server_ca, self.client_ca, self.other_ca = trustme.CA(), trustme.CA(), trustme.CA()
        self.server_cert, self.server_key = _files(tmp, "server", self.server_ca, "127.0.0.1")
        self.client_cert, self.client_key = _files(tmp, "client", self.client_ca, "ranker")
        self.rogue_cert, self.rogue_key = _files(tmp, "rogue", self.other_ca, "ranker")
        self.server_ca_file = _ca_file(tmp, "server", self.server_ca)
        self.client_ca_file = _ca_file(tmp, "client", self.client_ca)

    def client(self, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.server_ca_file.read_bytes(),
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None,
        )


@pytest_asyncio.fixture(loop_scope="session")
async def mtls(artifacts_root: Path, tmp_path: Path) -> AsyncIterator[tuple[Pki, int]]:
    """A candidate server that requires client certificates from ``client_ca``."""
    pki = Pki(tmp_path)
    tls = ServerTls(
        cert_file=str(pki.server_cert),
        key_file=str(pki.server_key),
        client_ca_file=str(pki.client_ca_file),
    )
    server, _ = await create_candidate(CandidateConfig(port=0, tls=tls), artifacts_root)
    yield pki, server.port
    await server.stop(0)


async def test_mutual_tls_admits_only_clients_with_a_certificate_from_its_ca(mtls) -> None:  # type: ignore[no-untyped-def]
    pki, port = mtls
    good = await _retrieve(port, pki.client(pki.client_cert, pki.client_key))
    assert len(good.item_ids) == 5
    for creds in (pki.client(), pki.client(pki.rogue_cert, pki.rogue_key)):
        # no client certificate, then one from another CA: the handshake fails
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _retrieve(port, creds)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # a client that does not trust the server's CA refuses the server
    wrong_root = grpc.ssl_channel_credentials(
        root_certificates=_ca_file(pki.tmp, "other", pki.other_ca).read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _retrieve(port, wrong_root)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # and plaintext is not answered at all
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await sieve_pb2_grpc.CandidateServiceStub(ch).Retrieve(RETRIEVE, timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_ranker_reaches_the_candidate_over_mutual_tls(mtls, artifacts_root) -> None:  # type: ignore[no-untyped-def]
    from ranker.service import create_server as create_ranker

    pki, port = mtls
    config = RankerConfig(
        port=0,
        candidate_address=f"127.0.0.1:{port}",
        item_refresh_s=0,
        rerank=STATELESS,
        reliability=RELAXED,
        candidate_tls=ClientTls(
            ca_file=str(pki.server_ca_file),
            cert_file=str(pki.client_cert),
            key_file=str(pki.client_key),
        ),
    )
    server, _ = await create_ranker(config, artifacts_root)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            resp = await sieve_pb2_grpc.RankerServiceStub(ch).Rank(
                sieve_pb2.RankRequest(user_id=42, k=10), timeout=30
            )
        assert len(resp.items) == 10 and not resp.rungs, resp.degradations
    finally:
        await server.stop(0)


async def test_a_rotated_certificate_is_served_without_a_restart(  # type: ignore[no-untyped-def]
    artifacts_root, tmp_path
) -> None:
    first, second = trustme.CA(), trustme.CA()
    cert, key = _files(tmp_path, "live", first, "127.0.0.1")
    tls = ServerTls(cert_file=str(cert), key_file=str(key))
    server, _ = await create_candidate(CandidateConfig(port=0, tls=tls), artifacts_root)
    trust = {
        name: grpc.ssl_channel_credentials(_ca_file(tmp_path, name, ca).read_bytes())
        for name, ca in (("first", first), ("second", second))
    }
    try:
        assert len((await _retrieve(server.port, trust["first"])).item_ids) == 5
        with pytest.raises(grpc.aio.AioRpcError):
            await _retrieve(server.port, trust["second"])
        # rotate: a certificate from the second CA, written as a deploy tool would
        # (new files moved over the old ones)
        new_cert, new_key = _files(tmp_path, "next", second, "127.0.0.1")
        os.replace(new_key, key)
        os.replace(new_cert, cert)
        assert len((await _retrieve(server.port, trust["second"])).item_ids) == 5
        with pytest.raises(grpc.aio.AioRpcError):
            await _retrieve(server.port, trust["first"])
    finally:
        await server.stop(0)


async def test_plaintext_on_a_reachable_address_is_said_loudly(  # type: ignore[no-untyped-def]
    artifacts_root, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="sieve.tls")
    server, _ = await create_candidate(CandidateConfig(host="0.0.0.0", port=0), artifacts_root)
    await server.stop(0)
    assert any("PLAINTEXT on 0.0.0.0" in r.getMessage() for r in caplog.records)
    caplog.clear()
    server, _ = await create_candidate(CandidateConfig(port=0), artifacts_root)  # loopback
    await server.stop(0)
    assert not any("PLAINTEXT" in r.getMessage() for r in caplog.records)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("")


def test_tls_settings_that_cannot_work_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        ServerTls(cert_file="a.pem")
    with pytest.raises(ValueError, match="client_ca_file needs cert_file"):
        ServerTls(client_ca_file="ca.pem")
    with pytest.raises(ValueError, match="need ca_file"):
        ClientTls(cert_file="c.pem", key_file="c.key")
    from sieve.tls import server_credentials

    with pytest.raises(ConfigError, match="cert_file .*missing.pem is not readable"):
        server_credentials(
            ServerTls(cert_file=str(tmp_path / "missing.pem"), key_file=str(tmp_path / "k"))
        )
