"""Ed25519 keys and key files: real keys, real files, exact messages."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from builder.keyfiles import load_public_key, load_signing_key, public_key_path, write_key_pair
from signing.errors import FormatError, KeyFileError
from signing.keys import KEY_TYPE, PublicKey, SigningKey

HINT = "give --passphrase or set APPLIANCE_KEY_PASSPHRASE"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ec_private_pem() -> bytes:
    return generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_keyid_is_sha256_of_raw_public_key() -> None:
    key = SigningKey.generate()
    raw = key.public_key.raw
    assert len(raw) == 32
    assert key.keyid == hashlib.sha256(raw).hexdigest()
    assert key.public_key.keyid == key.keyid
    assert KEY_TYPE == "ed25519"


def test_sign_and_verify() -> None:
    key = SigningKey.generate()
    signature = key.sign(b"message")
    assert len(signature) == 64
    public = key.public_key
    assert public.verify(signature, b"message") is True
    assert public.verify(signature, b"messagf") is False
    assert public.verify(bytes(64), b"message") is False
    assert public.verify(signature[:63], b"message") is False
    assert SigningKey.generate().public_key.verify(signature, b"message") is False


def test_public_key_needs_32_bytes() -> None:
    with pytest.raises(FormatError) as caught:
        PublicKey(b"\x01" * 31)
    assert str(caught.value) == "an Ed25519 public key is 32 bytes"


def test_public_key_metadata_round_trip() -> None:
    public = SigningKey.generate().public_key
    value = public.to_metadata()
    assert value == {"keytype": "ed25519", "scheme": "ed25519", "public": public.raw.hex()}
    assert PublicKey.from_metadata(value, what="root key") == public


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"extra": "x"},
            "root key: key must have exactly the fields ['keytype', 'public', 'scheme']",
        ),
        ({"keytype": "rsa"}, "root key: keytype must be 'ed25519'"),
        ({"scheme": "ed25519ph"}, "root key: scheme must be 'ed25519'"),
        ({"public": "AB" * 32}, "root key: public must be 64 lowercase hex digits"),
        ({"public": "ab" * 31}, "root key: public must be 64 lowercase hex digits"),
        ({"public": 5}, "root key: public must be 64 lowercase hex digits"),
    ],
)
def test_public_key_metadata_is_strict(change: dict[str, object], message: str) -> None:
    value: dict[str, object] = {**SigningKey.generate().public_key.to_metadata(), **change}
    with pytest.raises(FormatError) as caught:
        PublicKey.from_metadata(value, what="root key")
    assert str(caught.value) == message


def test_public_key_metadata_must_be_object() -> None:
    with pytest.raises(FormatError) as caught:
        PublicKey.from_metadata(["ed25519"], what="root key")
    assert str(caught.value) == "root key: key must be an object"


def test_pem_round_trips() -> None:
    key = SigningKey.generate()
    assert PublicKey.from_pem(key.public_key.to_pem()) == key.public_key
    plain = key.to_pem(None)
    assert plain.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert SigningKey.from_pem(plain, None).keyid == key.keyid
    encrypted = key.to_pem(b"secret")
    assert encrypted.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert SigningKey.from_pem(encrypted, b"secret").keyid == key.keyid


def test_public_pem_must_be_ed25519() -> None:
    ec_public = generate_private_key(SECP256R1()).public_key()
    pem = ec_public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(FormatError) as caught:
        PublicKey.from_pem(pem)
    assert str(caught.value) == "not an Ed25519 public key"
    with pytest.raises(FormatError) as caught:
        PublicKey.from_pem(b"junk")
    assert str(caught.value) == "not a PEM public key"


def test_empty_passphrase_cannot_encrypt() -> None:
    with pytest.raises(KeyFileError) as caught:
        SigningKey.generate().to_pem(b"")
    assert str(caught.value) == "an empty passphrase cannot encrypt a key"


def test_repr_hides_key_material() -> None:
    key = SigningKey.generate()
    assert repr(key) == f"SigningKey(keyid={key.keyid[:12]})"


def test_write_and_load_without_passphrase(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "root1.key"
    write_key_pair(path, key, None)
    assert public_key_path(path) == tmp_path / "root1.key.pub"
    assert _mode(path) == 0o600
    assert _mode(tmp_path / "root1.key.pub") == 0o644
    assert load_signing_key(path, None).keyid == key.keyid
    assert load_public_key(tmp_path / "root1.key.pub") == key.public_key


def test_write_and_load_with_passphrase(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "bundle.key"
    write_key_pair(path, key, b"correct horse")
    assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert _mode(path) == 0o600
    assert load_signing_key(path, b"correct horse").keyid == key.keyid


def test_private_file_mode_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_key_pair(tmp_path / "k", SigningKey.generate(), None)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "k") == 0o600
    assert _mode(tmp_path / "k.pub") == 0o644


def test_refuses_to_overwrite_private_key(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"precious")
    with pytest.raises(KeyFileError) as caught:
        write_key_pair(path, SigningKey.generate(), None)
    assert str(caught.value) == f"key {path} already exists: refusing to overwrite it"
    assert path.read_bytes() == b"precious"
    assert not (tmp_path / "k.pub").exists()


def test_refuses_to_overwrite_public_key(tmp_path: Path) -> None:
    path = tmp_path / "k"
    (tmp_path / "k.pub").write_bytes(b"precious")
    with pytest.raises(KeyFileError) as caught:
        write_key_pair(path, SigningKey.generate(), None)
    assert str(caught.value) == f"key {tmp_path / 'k.pub'} already exists: refusing to overwrite it"
    assert not path.exists()
    assert (tmp_path / "k.pub").read_bytes() == b"precious"


def test_refuses_to_write_through_dangling_symlink(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(KeyFileError) as caught:
        write_key_pair(path, SigningKey.generate(), None)
    assert str(caught.value) == f"key {path} already exists: refusing to overwrite it"
    assert not (tmp_path / "elsewhere").exists()


def test_write_into_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "k"
    with pytest.raises(KeyFileError) as caught:
        write_key_pair(path, SigningKey.generate(), None)
    assert str(caught.value) == f"key {path}: cannot write: No such file or directory"


def test_missing_key_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(KeyFileError) as caught:
        load_signing_key(path, None)
    assert str(caught.value) == f"key {path}: no such file"
    with pytest.raises(KeyFileError) as caught:
        load_public_key(path)
    assert str(caught.value) == f"key {path}: no such file"


def test_encrypted_key_without_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "k"
    write_key_pair(path, SigningKey.generate(), b"pw")
    for passphrase in (None, b""):
        with pytest.raises(KeyFileError) as caught:
            load_signing_key(path, passphrase)
        assert str(caught.value) == f"key {path} is encrypted: {HINT}"


def test_wrong_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "k"
    write_key_pair(path, SigningKey.generate(), b"pw")
    with pytest.raises(KeyFileError) as caught:
        load_signing_key(path, b"wrong")
    assert str(caught.value) == f"key {path}: wrong passphrase"


def test_passphrase_for_unencrypted_key(tmp_path: Path) -> None:
    path = tmp_path / "k"
    write_key_pair(path, SigningKey.generate(), None)
    with pytest.raises(KeyFileError) as caught:
        load_signing_key(path, b"pw")
    assert str(caught.value) == f"key {path} is not encrypted, but a passphrase was given"


def test_not_an_ed25519_private_key(tmp_path: Path) -> None:
    path = tmp_path / "ec.key"
    path.write_bytes(_ec_private_pem())
    with pytest.raises(KeyFileError) as caught:
        load_signing_key(path, None)
    assert str(caught.value) == f"key {path}: not an Ed25519 private key"
    with pytest.raises(KeyFileError) as caught:
        load_public_key(path)
    assert str(caught.value) == f"key {path}: not an Ed25519 private key"


def test_not_a_pem_file(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"hello")
    with pytest.raises(KeyFileError) as caught:
        load_signing_key(path, None)
    assert str(caught.value) == f"key {path}: not a PEM private key"
    with pytest.raises(KeyFileError) as caught:
        load_public_key(path)
    assert str(caught.value) == f"key {path}: not a PEM public key"


def test_key_file_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as caught:
        load_signing_key(tmp_path, None)
    assert str(caught.value) == f"key {tmp_path}: cannot read: Is a directory"


def test_oversized_key_file(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"A" * (64 * 1024 + 1))
    with pytest.raises(KeyFileError) as caught:
        load_signing_key(path, None)
    assert str(caught.value) == f"key {path}: larger than 65536 bytes, not a key file"


def test_public_key_from_private_pem(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "k"
    write_key_pair(path, key, None)
    assert load_public_key(path) == key.public_key


def test_public_key_from_encrypted_private_pem(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "k"
    write_key_pair(path, key, b"pw")
    with pytest.raises(KeyFileError) as caught:
        load_public_key(path)
    assert str(caught.value) == (
        f"key {path} is an encrypted private key: give its public key file instead"
    )
    assert load_public_key(public_key_path(path)) == key.public_key
