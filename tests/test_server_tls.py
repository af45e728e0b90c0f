"""TLS on ``appliance serve``: real handshakes against a test CA made here with ``cryptography``.

The official ``openai`` client talks to a real server on loopback over HTTPS, trusting only the
test CA; a client that allows nothing newer than TLS 1.2 is refused when the minimum is 1.3 (and
accepted when it is not, so the refusal is the setting's doing); a missing, unreadable,
malformed, encrypted or mismatched certificate or key is one line and exit 2, before a socket
is bound.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from server_helpers import (
    HAVE_LLAMA,
    LLAMA_MISSING,
    MODEL_ID,
    LiveServer,
    chat_messages,
    live_server,
    load_model,
    write_model,
)

from appliance.server.holder import ModelHolder
from appliance.server.tls import server_context
from appliance.service import ServiceSpec, render_unit
from signing.errors import InputError

# -- a test CA and a server certificate ---------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate clients trust
    cert: Path  # the server's, for 127.0.0.1 and localhost, signed by the CA
    key: Path
    other_key: Path  # a key that belongs to no certificate here
    encrypted_key: Path  # the server's key under a passphrase


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(
    path: Path, key: ec.EllipticCurvePrivateKey, *, password: bytes | None = None
) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if password is None
        else serialization.BestAvailableEncryption(password)
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    return path


def make_pki(directory: Path) -> Pki:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("appliance test CA"))
        .issuer_name(_name("appliance test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca = directory / "ca.pem"
    ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert = directory / "server.pem"
    cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return Pki(
        ca=ca,
        cert=cert,
        key=_write_key(directory / "server.key", server_key),
        other_key=_write_key(directory / "other.key", ec.generate_private_key(ec.SECP256R1())),
        encrypted_key=_write_key(directory / "encrypted.key", server_key, password=b"secret"),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def holder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelHolder]:
    if not HAVE_LLAMA:
        pytest.skip(LLAMA_MISSING)
    base = tmp_path_factory.mktemp("tls-model")
    made = ModelHolder(load_model(write_model(base / "tiny.gguf"), parallel=1))
    yield made
    made.close()


@contextmanager
def tls_server(
    root: Path, holder: ModelHolder, pki: Pki, min_version: str | None = None
) -> Iterator[LiveServer]:
    with live_server(
        root,
        holder,
        max_concurrency=1,
        tls_cert=pki.cert,
        tls_key=pki.key,
        tls_min_version=min_version,
    ) as live:
        yield live


def trusting(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=pki.ca)


def handshake(url: str, context: ssl.SSLContext) -> str:
    """The TLS version a handshake with the server at ``url`` settles on."""
    port = int(url.rsplit(":", 1)[1])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        version = tls.version()
    assert version is not None
    return version


# -- the server over TLS ------------------------------------------------------------------------


def test_the_openai_client_talks_https_trusting_the_test_ca(
    tmp_path: Path, holder: ModelHolder, pki: Pki
) -> None:
    with tls_server(tmp_path / "root", holder, pki) as server:
        assert server.url.startswith("https://127.0.0.1:")
        with httpx.Client(verify=trusting(pki)) as http:
            client = server.client(http_client=http)
            assert [m.id for m in client.models.list()] == [MODEL_ID]
            answer = client.chat.completions.create(
                model=MODEL_ID, messages=chat_messages(), max_tokens=2, temperature=0
            )
        assert answer.usage is not None
        assert answer.usage.completion_tokens >= 1
        # Without the CA, the same client refuses the server: the certificate is checked.
        with httpx.Client() as untrusting, pytest.raises(openai.APIConnectionError):
            server.client(http_client=untrusting).models.list()
        # And nothing is served in clear text on that port.
        with pytest.raises(httpx.TransportError):
            httpx.get(server.url.replace("https://", "http://") + "/healthz", timeout=10)


def test_a_tls_1_2_client_is_refused_when_the_minimum_is_1_3(
    tmp_path: Path, holder: ModelHolder, pki: Pki
) -> None:
    old_client = trusting(pki)
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    with tls_server(tmp_path / "strict", holder, pki, min_version="1.3") as server:
        assert handshake(server.url, trusting(pki)) == "TLSv1.3"
        with pytest.raises(ssl.SSLError):  # the server ends the handshake
            handshake(server.url, old_client)
        with httpx.Client(verify=old_client) as http, pytest.raises(openai.APIConnectionError):
            server.client(http_client=http).models.list()
    # The same client is served where the minimum is the default, 1.2.
    with tls_server(tmp_path / "default", holder, pki) as server:
        assert handshake(server.url, old_client) == "TLSv1.2"


# -- refusals, before anything is bound ---------------------------------------------------------


def test_bad_certificates_and_keys_are_one_line(tmp_path: Path, pki: Pki) -> None:
    assert server_context(pki.cert, pki.key, "1.3") is not None
    assert server_context(None, None, None) is None
    combined = tmp_path / "combined.pem"
    combined.write_bytes(pki.cert.read_bytes() + pki.key.read_bytes())
    assert server_context(combined, None, None) is not None  # the key inside the certificate

    missing = tmp_path / "missing.pem"
    not_pem = tmp_path / "junk.pem"
    not_pem.write_text("not a certificate\n")
    cases = {
        (missing, pki.key, None): f"TLS certificate {missing} does not exist",
        (pki.cert, missing, None): f"TLS key {missing} does not exist",
        (pki.cert, tmp_path, None): f"cannot read TLS key {tmp_path}: Is a directory",
        (not_pem, pki.key, None): f"TLS certificate {not_pem} holds no PEM certificate",
        (pki.cert, not_pem, None): f"TLS key {not_pem} holds no PEM private key",
        (pki.cert, None, None): f"TLS key {pki.cert} holds no PEM private key",
        (pki.cert, pki.other_key, None): (
            f"TLS key {pki.other_key} does not match certificate {pki.cert}"
        ),
        (pki.cert, pki.encrypted_key, None): (
            f"TLS key {pki.encrypted_key} is encrypted; give serve an unencrypted key (mode 0600)"
        ),
        (None, pki.key, None): "server setting tls_key needs tls_cert (a PEM certificate file)",
        (None, None, "1.3"): (
            "server setting tls_min_version needs tls_cert (a PEM certificate file)"
        ),
    }
    for (cert, key, minimum), message in cases.items():
        with pytest.raises(InputError) as caught:
            server_context(cert, key, minimum)
        assert caught.value.diagnostics() == message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_key_is_refused(tmp_path: Path, pki: Pki) -> None:
    locked = tmp_path / "locked.key"
    locked.write_bytes(pki.key.read_bytes())
    locked.chmod(0)
    with pytest.raises(InputError, match=f"cannot read TLS key {locked}: Permission denied"):
        server_context(pki.cert, locked, None)


def appliance(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_serve_refuses_a_mismatched_key_before_anything_else(tmp_path: Path, pki: Pki) -> None:
    # The root has no keys and no slot: serve would refuse those with exit 5; TLS comes first.
    result = appliance(
        tmp_path, "serve", "--port", "0", "--tls-cert", str(pki.cert), "--tls-key",
        str(pki.other_key), "--tls-min-version", "1.3",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        f"error: TLS key {pki.other_key} does not match certificate {pki.cert}\n"
    )
    wrong = appliance(tmp_path, "serve", "--tls-cert", str(pki.cert), "--tls-min-version", "1.1")
    assert wrong.returncode == 2
    assert "'1.1' is not one of '1.2', '1.3'" in wrong.stderr
    by_env = subprocess.run(
        [sys.executable, "-m", "appliance", "--root", str(tmp_path), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "APPLIANCE_TLS_CERT": str(tmp_path / "nope.pem")},
    )
    assert by_env.returncode == 2
    assert by_env.stderr == f"error: TLS certificate {tmp_path / 'nope.pem'} does not exist\n"


def test_the_service_unit_passes_tls_and_listens_on_loopback(tmp_path: Path) -> None:
    plain = render_unit(ServiceSpec(root=tmp_path))
    assert "--host 127.0.0.1" in plain
    assert "--tls" not in plain
    spec = ServiceSpec(
        root=tmp_path,
        host="0.0.0.0",  # noqa: S104 - what an operator opening it would write
        tls_cert=Path("/etc/appliance/tls/server.pem"),
        tls_key=Path("/etc/appliance/tls/server.key"),
        tls_min_version="1.3",
    )
    assert spec.exec_start().endswith(
        "--host 0.0.0.0 --port 8080 --tls-cert /etc/appliance/tls/server.pem "
        "--tls-key /etc/appliance/tls/server.key --tls-min-version 1.3"
    )
