"""TLS for ``appliance serve``: the server's ``ssl.SSLContext``, or one line saying why not.

``serve`` builds the context before it loads a model or binds a socket, so that a missing,
unreadable, malformed or mismatched certificate or key is refused at once with one line and
exit 2 (:class:`~signing.errors.InputError`), never a traceback from inside uvicorn. The same
context then serves every connection through the connection guard's TLS protocol
(appliance.server.connections), which counts a connection from ``accept()`` and puts its
handshake inside the request head deadline; uvicorn could not set a minimum protocol version,
nor count a connection before its handshake ends.

TLS 1.2 is the floor whatever the setting (Python's own default for servers); ``1.3`` refuses
TLS 1.2 clients too. An encrypted key is refused rather than prompted for: a service has no
terminal, and a key whose passphrase sits in a file next to it protects nothing.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Final, NoReturn

from signing.errors import InputError

log = logging.getLogger(__name__)

MIN_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_BEGIN_CERT: Final = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY: Final = b"PRIVATE KEY-----"  # PKCS#8, or the RSA/EC headers of OpenSSL
_LOOPBACK: Final = frozenset({"127.0.0.1", "::1", "localhost"})


def server_context(
    cert: Path | None, key: Path | None, min_version: str | None
) -> ssl.SSLContext | None:
    """The context serving ``cert`` with ``key`` (None: the key is in the certificate file), at
    least TLS ``min_version`` (default 1.2); None when no certificate is given."""
    if cert is None:
        if key is not None or min_version is not None:
            given = "tls_key" if key is not None else "tls_min_version"
            raise InputError(f"server setting {given} needs tls_cert (a PEM certificate file)")
        return None
    if min_version not in (None, *MIN_VERSIONS):
        raise InputError(f"server setting tls_min_version: {min_version!r} is not 1.2 or 1.3")
    if _BEGIN_CERT not in _read(cert, "certificate"):
        raise InputError(f"TLS certificate {cert} holds no PEM certificate")
    if _PRIVATE_KEY not in _read(key or cert, "key"):
        raise InputError(f"TLS key {key or cert} holds no PEM private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[min_version or "1.2"]
    context.set_alpn_protocols(["http/1.1"])  # h11 only (appliance.server.connections)
    try:
        context.load_cert_chain(cert, key, password=lambda: _encrypted(key or cert))
    except ssl.SSLError as exc:
        _refuse(cert, key, exc)
    except OSError as exc:
        raise InputError(f"cannot load TLS certificate {cert}: {exc.strerror or exc}") from None
    return context


def warn_if_plaintext(host: str, context: ssl.SSLContext | None) -> None:
    """One warning line when the API key would cross a network in clear text."""
    if context is None and host not in _LOOPBACK:
        log.warning(
            "listening on %s without TLS: API keys and prompts cross the network in clear "
            "text (see --tls-cert, docs/operator-guide.md)",
            host,
        )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"TLS {what} {path} does not exist") from None
    except OSError as exc:
        raise InputError(f"cannot read TLS {what} {path}: {exc.strerror}") from None


def _encrypted(key: Path) -> NoReturn:
    raise InputError(f"TLS key {key} is encrypted; give serve an unencrypted key (mode 0600)")


def _refuse(cert: Path, key: Path | None, exc: ssl.SSLError) -> NoReturn:
    if exc.reason == "KEY_VALUES_MISMATCH":
        raise InputError(f"TLS key {key or cert} does not match certificate {cert}") from None
    reason = exc.reason or exc.strerror or "unknown error"
    raise InputError(
        f"cannot load TLS certificate {cert} with key {key or cert}: {reason}"
    ) from None
