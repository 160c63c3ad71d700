"""wss:// (``protocol-v1.md``: Transport; an edge with ``tls_cert`` and ``tls_key``).

A self-signed certificate for 127.0.0.1 is made here with ``cryptography``;
the client trusts exactly that certificate.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from edge_helpers import ClusterThread, login, running_cluster, unique

pytestmark = pytest.mark.cluster


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "iris test edge")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "edge.crt", directory / "edge.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClusterThread, Path]]:
    base = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(base)
    with running_cluster(
        base / "cluster",
        nodes=3,
        edges=1,
        mode="cp",
        edge_options={"tls_cert": str(cert), "tls_key": str(key)},
    ) as c:
        yield c, cert


def wss_url(cluster: ClusterThread) -> str:
    return cluster.url(0).replace("ws://", "wss://", 1)


async def test_wss_client_exchanges_messages(tls: tuple[ClusterThread, Path]) -> None:
    cluster, cert = tls
    context = ssl.create_default_context(cafile=str(cert))
    alice, bob = unique("alice"), unique("bob")
    assert cluster.cluster.edges[0].info["url"].startswith("wss://")
    with trio.fail_after(20):
        async with (
            login(wss_url(cluster), cluster.token(alice), ssl_context=context) as sender,
            login(
                wss_url(cluster), cluster.token(bob), via="frame", ssl_context=context
            ) as receiver,
        ):
            assert sender.welcome is not None and sender.welcome["user"] == alice
            sent = await sender.send_message(bob, {"over": "tls"})
            (msg,) = await receiver.messages(1)
            assert msg["mid"] == sent["mid"] and msg["body"] == {"over": "tls"}
            assert (await receiver.ping(b"\x00"))["data"] == b"\x00"


async def test_plain_ws_client_gets_no_connection(tls: tuple[ClusterThread, Path]) -> None:
    """A plain-text WebSocket handshake: the edge speaks only TLS, so no ``101`` ever comes.

    (By hand over TCP: trio-websocket's client leaks its socket when a handshake fails.)
    """
    cluster, _ = tls
    host, port = cluster.cluster.edges[0].rpc.rsplit(":", 1)
    request = (
        f"GET /v1 HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: iris.v1\r\n"
        f"Authorization: Bearer {cluster.token(unique('plain'))}\r\n\r\n"
    )
    answer = b""
    with trio.fail_after(20):
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(request.encode())
            # A plain-text server answers a handshake at once; the TLS edge never does
            # (it drops the connection after its own handshake timeout): give it 2 s.
            with trio.move_on_after(2), contextlib.suppress(trio.BrokenResourceError):
                while chunk := await stream.receive_some(4096):
                    answer += chunk
    assert not answer.startswith(b"HTTP/1.1 101"), answer
    assert b"Switching Protocols" not in answer


async def test_client_that_does_not_trust_the_certificate_is_refused(
    tls: tuple[ClusterThread, Path],
) -> None:
    cluster, _ = tls
    host, port = cluster.cluster.edges[0].rpc.rsplit(":", 1)
    with trio.fail_after(20):
        stream = await trio.open_ssl_over_tcp_stream(
            host, int(port), ssl_context=ssl.create_default_context(), https_compatible=True
        )
        with pytest.raises(trio.BrokenResourceError) as info:
            await stream.do_handshake()
        await stream.transport_stream.aclose()
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError), info.value.__cause__
