"""Test certificates from trustme: one CA, a server certificate, a client certificate.

The server certificate names ``localhost`` and ``127.0.0.1`` so clients can
verify the host either way (libpq ``sslmode=verify-full``, Python's
``check_hostname``). The client certificate's common name is a user name, for
certificate logins (RabbitMQ's EXTERNAL mechanism, Postgres ``cert`` auth).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

__all__ = ["TlsFiles", "make_tls_files"]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA to trust, the server's chain and key, a client's chain and key."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_name: str

    def client_context(self, with_client_cert: bool = False) -> ssl.SSLContext:
        """A verifying client context trusting only the CA (optionally presenting the client
        certificate)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if with_client_cert:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def make_tls_files(directory: Path, client_name: str = "cdc_relay") -> TlsFiles:
    """A fresh CA and certificates written into ``directory`` (keys readable by us only)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert(f"{client_name}@client.test", common_name=client_name)
    files = TlsFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        client_name=client_name,
    )
    ca.cert_pem.write_to_path(str(files.ca))
    files.server_cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    files.client_cert.write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
    for key, leaf in ((files.server_key, server), (files.client_key, client)):
        key.touch(mode=0o600)
        leaf.private_key_pem.write_to_path(str(key))
    return files
