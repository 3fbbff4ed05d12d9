"""TLS and mutual TLS for both services and the ranker -> candidate hop.

A server with ``cert_file`` and ``key_file`` serves TLS; with ``client_ca_file``
too it requires every client to present a certificate that CA signed (mutual
TLS). Its certificate files are re-read when they change: gRPC asks for the
certificate configuration at each new handshake (``dynamic_ssl_server_credentials``)
and gets the files' contents again once their modification time or size moved,
so a rotated certificate is served without a restart (connections already open
keep theirs until they close; ``max_connection_age_s`` bounds that).

Plaintext stays the embedded default (``make demo``); a server that listens in
plaintext on an address other than loopback says so loudly at start.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from pathlib import Path

import grpc
from pydantic import model_validator

from sieve.config import Frozen
from sieve.errors import ConfigError

log = logging.getLogger(__name__)


class ServerTls(Frozen):
    """A service's TLS: empty files (the default) serve plaintext."""

    cert_file: str = ""
    """PEM certificate chain the service presents."""
    key_file: str = ""
    """PEM private key of ``cert_file``."""
    client_ca_file: str = ""
    """PEM CA bundle: set, clients must present a certificate it signed (mutual
    TLS); empty, any client that trusts the server may call."""

    @model_validator(mode="after")
    def _both_or_neither(self) -> ServerTls:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls needs both cert_file and key_file (or neither: plaintext)")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("tls.client_ca_file needs cert_file and key_file (mutual TLS)")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


class ClientTls(Frozen):
    """How a client of ours (the ranker's candidate channel) speaks TLS: an empty
    ``ca_file`` (the default) is plaintext."""

    ca_file: str = ""
    """PEM CA bundle the server's certificate must chain to."""
    cert_file: str = ""
    """PEM client certificate, for servers that require one (mutual TLS)."""
    key_file: str = ""
    server_name: str = ""
    """The name to check in the server's certificate, when it is not the address's
    host (e.g. an IP address behind a certificate for a DNS name)."""

    @model_validator(mode="after")
    def _complete(self) -> ClientTls:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate needs both cert_file and key_file")
        if (self.cert_file or self.server_name) and not self.ca_file:
            raise ValueError("client TLS settings need ca_file (the CA the server chains to)")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"tls {what} {path} is not readable: {e}") from e


class _Rotating:
    """The certificate configuration gRPC fetches at each handshake: the files
    again once one of them changed, otherwise None ("unchanged")."""

    def __init__(self, tls: ServerTls) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        self._seen = self._stamp()
        self.config = self._load()

    def _files(self) -> list[str]:
        return [f for f in (self.tls.cert_file, self.tls.key_file, self.tls.client_ca_file) if f]

    def _stamp(self) -> tuple[tuple[int, int], ...]:
        out = []
        for f in self._files():
            try:
                st = os.stat(f)
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((-1, -1))
        return tuple(out)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        chain = _read(self.tls.cert_file, "cert_file")
        pair = (_read(self.tls.key_file, "key_file"), chain)
        ca = _read(self.tls.client_ca_file, "client_ca_file") if self.tls.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            stamp = self._stamp()
            if stamp == self._seen:
                return None
            try:
                config = self._load()
            except ConfigError as e:  # mid-rotation (a file half written): keep the old one
                log.warning("tls certificate files changed but are not readable yet: %s", e)
                return None
            self._seen = stamp
            log.info("tls certificate files changed: serving the new certificate")
            return config


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """Credentials for ``add_secure_port`` that follow the files as they rotate.

    Raises:
        ConfigError: a file is missing or unreadable at start.
    """
    rotating = _Rotating(tls)
    return grpc.dynamic_ssl_server_credentials(
        rotating.config, rotating, require_client_authentication=bool(tls.client_ca_file)
    )


def channel_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    """Credentials for ``secure_channel``.

    Raises:
        ConfigError: a file is missing or unreadable.
    """
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, "ca_file"),
        private_key=_read(tls.key_file, "key_file") if tls.key_file else None,
        certificate_chain=_read(tls.cert_file, "cert_file") if tls.cert_file else None,
    )


def channel_options(tls: ClientTls) -> list[tuple[str, object]]:
    """The name checked in the server's certificate, when ``server_name`` says."""
    return [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only reaches this machine."""
    if host == "localhost":
        return True
    try:  # "" (every interface) is not an address: not loopback
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(service: str, host: str, tls: ServerTls) -> None:
    """Say loudly that ``service`` listens in plaintext on a non-loopback address."""
    if not tls.enabled and not is_loopback(host):
        log.warning(
            "%s listens in PLAINTEXT on %s, an address other machines can reach: anyone who "
            "reaches the port can call it and read the answers; set [%s.tls] cert_file and "
            "key_file (and client_ca_file for mutual TLS)",
            service, host, service,
        )  # fmt: skip
