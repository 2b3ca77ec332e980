"""Ed25519 signing keys: kid derivation, encrypted PEM storage, public JWKs."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.auth import keys
from services.auth.keys import (
    KeyLoadError,
    SigningKey,
    b64url_encode,
    generate_signing_key,
    load_signing_key,
    public_key_from_jwk,
)


def test_kid_is_derived_from_the_public_key() -> None:
    key = generate_signing_key()
    raw = keys.raw_public_bytes(key.public_key)
    assert key.kid == b64url_encode(hashlib.sha256(raw).digest()[:12])
    assert re.fullmatch(r"[A-Za-z0-9_-]{16}", key.kid)
    assert generate_signing_key().kid != key.kid


def test_private_key_is_stored_encrypted_and_loads_back() -> None:
    key = generate_signing_key()
    pem = key.to_encrypted_pem("s3cret passphrase")
    assert pem.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    loaded = load_signing_key(key.kid, pem, "s3cret passphrase")
    assert loaded.kid == key.kid
    assert keys.raw_public_bytes(loaded.public_key) == keys.raw_public_bytes(key.public_key)
    # bytes and str passphrases are the same passphrase
    assert load_signing_key(key.kid, pem, b"s3cret passphrase").kid == key.kid


def test_wrong_passphrase_is_a_key_load_error() -> None:
    key = generate_signing_key()
    pem = key.to_encrypted_pem("right")
    with pytest.raises(KeyLoadError, match="wrong passphrase"):
        load_signing_key(key.kid, pem, "wrong")


def test_empty_passphrase_is_refused() -> None:
    key = generate_signing_key()
    with pytest.raises(ValueError, match="must not be empty"):
        key.to_encrypted_pem("")
    with pytest.raises(ValueError, match="must not be empty"):
        load_signing_key(key.kid, key.to_encrypted_pem("x"), b"")


def test_a_key_filed_under_another_kid_is_refused() -> None:
    key = generate_signing_key()
    other = generate_signing_key()
    with pytest.raises(KeyLoadError, match="does not match"):
        load_signing_key(other.kid, key.to_encrypted_pem("p"), "p")


def test_repr_does_not_show_key_material() -> None:
    key = generate_signing_key()
    assert repr(key) == f"SigningKey(kid={key.kid!r})"


def test_public_jwk_shape_and_round_trip() -> None:
    key = generate_signing_key()
    jwk = key.public_jwk()
    assert set(jwk) == {"kty", "crv", "x", "kid", "alg", "use"}
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
    assert jwk["kid"] == key.kid
    assert "=" not in jwk["x"]
    assert len(jwk["x"]) == 43
    public = public_key_from_jwk(jwk)
    signature = key.private_key.sign(b"message")
    public.verify(signature, b"message")  # raises if it is not the same key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kty": "EC"}, "not an OKP"),
        ({"crv": "X25519"}, "not an OKP"),
        ({"alg": "ES256"}, "EdDSA"),
        ({"use": "enc"}, "signature key"),
        ({"x": None}, "no 'x'"),
        ({"x": "!!!!"}, "base64url"),
        ({"x": b64url_encode(b"\x01" * 31)}, "32-byte"),
        ({"d": "AAAA"}, "private key material"),
    ],
)
def test_public_key_from_jwk_rejects_anything_else(change: dict[str, Any], message: str) -> None:
    jwk: dict[str, Any] = {**generate_signing_key().public_jwk(), **change}
    with pytest.raises(ValueError, match=message):
        public_key_from_jwk(jwk)


def test_signing_key_accepts_any_ed25519_key() -> None:
    private = Ed25519PrivateKey.generate()
    key = SigningKey(kid=keys.kid_for(private.public_key()), private_key=private)
    assert load_signing_key(key.kid, key.to_encrypted_pem("p"), "p").kid == key.kid
