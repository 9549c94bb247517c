"""amqps:// URLs: parsing without leaking the password, the SSLContext they give, TLS for real.

The live tests run TLS against two local servers made with trustme certificates:
a TLS-terminating proxy in front of the session's real broker (publish and
confirm over TLS, certificate and hostname checks, SNI), and a TLS server that
speaks just enough AMQP (tests/amqp_fakes.py) to check EXTERNAL authentication with a client
certificate (the session broker has no TLS listener or auth_mechanism_ssl).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
import trustme

from cdc_relay.amqp import (
    AmqpAddress,
    ConnectError,
    Outcome,
    Publisher,
    declare_exchange,
    redact,
)
from cdc_relay.envelope import Envelope
from tests.amqp_fakes import FakeBroker, running

SECRET = "s3cr3t-pw"


# -- parsing ---------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: trustme.CA
    other_ca: trustme.CA
    files: dict[str, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, another CA, a client certificate issued by the first, and their files."""
    base = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    other_ca = trustme.CA()
    files = {name: base / f"{name}.pem" for name in ("ca", "other_ca", "client", "key", "junk")}
    ca.cert_pem.write_to_path(files["ca"])
    other_ca.cert_pem.write_to_path(files["other_ca"])
    client = ca.issue_cert("relay-client.example")
    client.cert_chain_pems[0].write_to_path(files["client"])
    client.private_key_pem.write_to_path(files["key"])
    files["junk"].write_text("not a certificate\n")
    files["unreadable"] = base / "missing.pem"
    return Pki(ca, other_ca, files)


def q(**params: str | Path) -> str:
    return urllib.parse.urlencode({k: str(v) for k, v in params.items()})


def test_amqps_url_parameters(pki: Pki) -> None:
    a = AmqpAddress.parse(
        f"amqps://relay:{SECRET}@mq.example/prod?"
        + q(
            cacertfile=pki.files["ca"],
            certfile=pki.files["client"],
            keyfile=pki.files["key"],
            server_name_indication="rabbit.internal",
        )
    )
    assert (a.host, a.port, a.user, a.vhost, a.tls) == ("mq.example", 5671, "relay", "prod", True)
    assert (a.cacertfile, a.certfile, a.keyfile) == tuple(
        str(pki.files[k]) for k in ("ca", "client", "key")
    )
    assert a.verify and a.auth_mechanism == "PLAIN" and a.tls_server_name == "rabbit.internal"
    assert SECRET not in repr(a)
    external = AmqpAddress.parse(
        "amqps://mq.example?"
        + q(certfile=pki.files["client"], keyfile=pki.files["key"], auth_mechanism="external")
    )
    assert external.auth_mechanism == "EXTERNAL" and external.tls_server_name == "mq.example"
    plain = AmqpAddress.parse("amqp://mq.example")
    assert (plain.tls, plain.port, plain.tls_server_name, plain.ssl_context()) == (
        False,
        5672,
        None,
        None,
    )


def test_ssl_context_from_the_url(pki: Pki) -> None:
    context = AmqpAddress.parse(f"amqps://h?{q(cacertfile=pki.files['ca'])}").ssl_context()
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1  # only the given CA, not the system store
    system = AmqpAddress.parse("amqps://h").ssl_context()
    assert system is not None and system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname
    assert system.cert_store_stats() == ssl.create_default_context().cert_store_stats()
    loose = AmqpAddress.parse("amqps://h?verify=verify_none").ssl_context()
    assert loose is not None and loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname


BAD_URLS = [
    (f"guest:{SECRET}@localhost:5672/", "must start with amqp"),
    (f"http://guest:{SECRET}@localhost/", "must start with amqp"),
    (f"amqp://guest:{SECRET}/x@localhost/", "percent-encode"),
    (f"amqp://guest:{SECRET}#x@localhost/", "percent-encode"),
    (f"amqp://guest:{SECRET}?x@localhost/", "percent-encode"),
    (f"amqp://guest:{SECRET}@localhost:99999/", "port"),
    (f"amqp://guest:{SECRET}@localhost/#frag", "fragment"),
    (f"amqps://guest:{SECRET}@localhost/?heartbeat_x=1", "unknown AMQP URL parameter"),
    (f"amqps://guest:{SECRET}@localhost/?verify=maybe", "verify must be"),
    (f"amqps://guest:{SECRET}@localhost/?verify=verify_peer&verify=verify_none", "twice"),
    (f"amqps://guest:{SECRET}@localhost/?auth_mechanism=kerberos", "auth_mechanism"),
    (f"amqps://guest:{SECRET}@localhost/?auth_mechanism=external", "needs a client certificate"),
    (f"amqp://guest:{SECRET}@localhost/?verify=verify_none", "needs an amqps"),
]


@pytest.mark.parametrize(("url", "message"), BAD_URLS)
def test_bad_urls_are_one_clean_error_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as failure:
        AmqpAddress.parse(url)
    assert SECRET not in str(failure.value)


@pytest.mark.asyncio
async def test_connect_errors_for_bad_urls_never_show_the_password() -> None:
    for url, message in BAD_URLS:
        publisher = Publisher([url], max_in_flight=1, on_outcome=lambda _: None)
        with pytest.raises(ConnectError, match=message) as failure:
            await publisher.connect()
        assert SECRET not in str(failure.value), url


def test_redact_hides_the_password_of_malformed_urls() -> None:
    assert redact(f"guest:{SECRET}@localhost:5672/") == "guest:***@localhost:5672/"
    assert redact(f"amqp://u:{SECRET}/x#y@host/v") == "amqp://u:***@host/v"
    assert redact(f"amqps://u:a@{SECRET}@host/") == "amqps://u:***@host/"
    assert redact("amqp://host/") == "amqp://host/"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"cacertfile": "unreadable"}, "cannot read cacertfile"),
        ({"certfile": "unreadable"}, "cannot read certfile"),
        ({"certfile": "junk"}, "cannot load the TLS files"),
        ({"cacertfile": "junk"}, "cannot load the TLS files"),
        ({"keyfile": "key"}, "keyfile needs certfile"),
    ],
)
def test_bad_tls_files_are_refused_when_parsing(
    pki: Pki, params: dict[str, str], message: str
) -> None:
    url = f"amqps://guest:{SECRET}@localhost/?" + q(**{k: pki.files[v] for k, v in params.items()})
    with pytest.raises(ValueError, match=message) as failure:
        AmqpAddress.parse(url)
    assert SECRET not in str(failure.value)


# -- a TLS proxy in front of the real broker -------------------------------------------------


@dataclass
class TlsProxy:
    port: int
    server_names: list[str | None] = field(default_factory=list)


@contextlib.asynccontextmanager
async def tls_proxy(amqp_url: str, server_cert: trustme.LeafCert) -> AsyncIterator[TlsProxy]:
    """TLS in, plain AMQP out to the broker; records the SNI each client sent."""
    target = urllib.parse.urlsplit(amqp_url)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(context)
    proxy = TlsProxy(0)

    def sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        proxy.server_names.append(name)

    context.sni_callback = sni  # type: ignore[assignment]
    pipes: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port)
        for task in (pipe(reader, up_writer), pipe(up_reader, writer)):
            pipes.add(asyncio.create_task(task))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)


async def publish_one(url: str, exchange: str) -> list[Outcome]:
    outcomes: list[Outcome] = []
    publisher = Publisher([url], max_in_flight=10, connect_timeout=5, on_outcome=outcomes.append)
    await publisher.connect()
    try:
        await publisher.publish(1, Envelope(exchange, "k", b"{}", "tls-1", "T", {}))
        assert await publisher.wait_confirmed(10)
    finally:
        await publisher.close()
    return outcomes


@pytest_asyncio.fixture
async def exchange(amqp_url: str) -> str:
    name = "test-tls"
    await declare_exchange([amqp_url], name)
    return name


@pytest.mark.asyncio
async def test_publish_and_confirm_over_tls_with_sni(
    amqp_url: str, exchange: str, pki: Pki
) -> None:
    ca = pki.ca
    async with tls_proxy(amqp_url, ca.issue_cert("localhost", "127.0.0.1")) as proxy:
        url = f"amqps://guest:guest@localhost:{proxy.port}/?" + q(cacertfile=pki.files["ca"])
        outcomes = await publish_one(url, exchange)
        assert [o.lost for o in outcomes if o.lost] == []
        assert sum(len(o.confirmed) + len(o.failed) for o in outcomes) == 1
        assert proxy.server_names == ["localhost"]
        assert await declare_exchange([url], exchange) == "already exists"


@pytest.mark.asyncio
async def test_untrusted_certificate_or_wrong_name_is_refused(
    amqp_url: str, exchange: str, pki: Pki
) -> None:
    ca = pki.ca
    async with tls_proxy(amqp_url, ca.issue_cert("rabbit.internal")) as proxy:
        base = f"amqps://guest:{SECRET}@127.0.0.1:{proxy.port}/?"
        for url, reason in [
            (base + q(cacertfile=pki.files["other_ca"]), "certificate verify failed"),
            (
                base + q(cacertfile=pki.files["ca"]),
                "127.0.0.1",
            ),  # the certificate names another host
            (base, "certificate verify failed"),  # system store: does not know the test CA
        ]:
            with pytest.raises(ConnectError, match=reason) as failure:
                await publish_one(url, exchange)
            assert SECRET not in str(failure.value)
        # The name the certificate has, sent as SNI and checked: accepted.
        good = base.replace(SECRET, "guest") + q(
            cacertfile=pki.files["ca"], server_name_indication="rabbit.internal"
        )
        assert await publish_one(good, exchange)
        assert proxy.server_names[-1] == "rabbit.internal"


@pytest.mark.asyncio
async def test_verify_none_connects_but_warns_loudly(
    amqp_url: str, exchange: str, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    other_ca = pki.other_ca
    async with tls_proxy(amqp_url, other_ca.issue_cert("elsewhere.example")) as proxy:
        url = f"amqps://guest:guest@127.0.0.1:{proxy.port}/?verify=verify_none"
        with caplog.at_level(logging.WARNING):
            assert await publish_one(url, exchange)
    assert any("WITHOUT certificate verification" in r.getMessage() for r in caplog.records)


# -- EXTERNAL authentication against a TLS server that speaks just enough AMQP ---------------


@contextlib.asynccontextmanager
async def tls_broker(pki: Pki, broker: FakeBroker) -> AsyncIterator[int]:
    """The fake broker behind TLS that requires a client certificate from pki's CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.ca.issue_cert("localhost").configure_cert(context)
    pki.ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED  # a client certificate is mandatory
    async with running(broker, context) as port:
        yield port


@pytest.mark.asyncio
async def test_external_auth_presents_the_client_certificate(pki: Pki) -> None:
    broker = FakeBroker(mechanisms="PLAIN EXTERNAL")
    async with tls_broker(pki, broker) as port:
        url = f"amqps://localhost:{port}/?" + q(
            cacertfile=pki.files["ca"],
            certfile=pki.files["client"],
            keyfile=pki.files["key"],
            auth_mechanism="external",
        )
        publisher = Publisher([url], max_in_flight=1, connect_timeout=5, on_outcome=lambda _: None)
        await publisher.connect()
        await publisher.close()
    assert broker.seen["mechanism"] == "EXTERNAL" and broker.seen["response"] == ""
    names = [value for kind, value in broker.seen["peercert"]["subjectAltName"] if kind == "DNS"]
    assert names == ["relay-client.example"]


@pytest.mark.asyncio
async def test_external_auth_not_offered_is_a_clear_error(pki: Pki) -> None:
    broker = FakeBroker(mechanisms="PLAIN AMQPLAIN")
    async with tls_broker(pki, broker) as port:
        url = f"amqps://localhost:{port}/?" + q(
            cacertfile=pki.files["ca"],
            certfile=pki.files["client"],
            keyfile=pki.files["key"],
            auth_mechanism="external",
        )
        publisher = Publisher([url], max_in_flight=1, connect_timeout=5, on_outcome=lambda _: None)
        with pytest.raises(ConnectError, match="does not offer the EXTERNAL mechanism"):
            await publisher.connect()
    assert "mechanism" not in broker.seen and broker.seen["peercert"]
