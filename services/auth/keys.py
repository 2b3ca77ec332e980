"""Ed25519 signing keys: generation, encrypted storage format and public JWKs.

Why Ed25519 (EdDSA, RFC 8037): small keys and signatures, fast verification in every
service, and no parameter choices to get wrong (unlike RSA padding or ECDSA nonces).

The ``kid`` is derived from the public key (base64url of the first 12 bytes of its
SHA-256), so it is stable, needs no coordination between regions, and lets a loader
check that a stored private key really belongs to the kid it is filed under.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

ALGORITHM = "EdDSA"
_KID_BYTES = 12
_RAW_KEY_BYTES = 32


class KeyLoadError(Exception):
    """A stored key cannot be used: wrong passphrase, corrupt PEM or mismatched kid."""


def b64url_encode(data: bytes) -> str:
    """Base64url without padding, as JOSE requires."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of ``b64url_encode``; rejects characters outside the alphabet."""
    padded = text + "=" * (-len(text) % 4)
    return base64.b64decode(padded, altchars=b"-_", validate=True)


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def kid_for(public_key: Ed25519PublicKey) -> str:
    """The key id of ``public_key``: b64url(sha256(raw public key)[:12])."""
    return b64url_encode(hashlib.sha256(raw_public_bytes(public_key)).digest()[:_KID_BYTES])


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    data = passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase
    if not data:
        # An empty passphrase would silently mean "store the private key in clear".
        raise ValueError("the signing key passphrase must not be empty")
    return data


@dataclass(frozen=True)
class SigningKey:
    """A private signing key with its key id."""

    kid: str
    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def public_jwk(self) -> dict[str, str]:
        return public_jwk(self.public_key, self.kid)

    def to_encrypted_pem(self, passphrase: str | bytes) -> str:
        """PKCS#8 PEM encrypted with ``passphrase``: the only form a private key is stored in."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(_passphrase_bytes(passphrase)),
        ).decode("ascii")

    def __repr__(self) -> str:
        # Keep private key material out of logs and tracebacks.
        return f"SigningKey(kid={self.kid!r})"


def generate_signing_key() -> SigningKey:
    private_key = Ed25519PrivateKey.generate()
    return SigningKey(kid=kid_for(private_key.public_key()), private_key=private_key)


def load_signing_key(kid: str, pem: str, passphrase: str | bytes) -> SigningKey:
    """Decrypt a stored private key and check that it is the key ``kid`` names."""
    password = _passphrase_bytes(passphrase)
    try:
        private_key = serialization.load_pem_private_key(pem.encode("ascii"), password=password)
    except (ValueError, TypeError) as exc:
        # cryptography's message says "incorrect password" or "could not deserialize";
        # neither contains key material, but we keep our own wording stable.
        raise KeyLoadError(
            f"cannot decrypt signing key {kid!r}: wrong passphrase or corrupt PEM"
        ) from exc
    if not isinstance(private_key, Ed25519PrivateKey):
        raise KeyLoadError(f"signing key {kid!r} is not an Ed25519 key")
    if kid_for(private_key.public_key()) != kid:
        raise KeyLoadError(f"signing key {kid!r} does not match its kid")
    return SigningKey(kid=kid, private_key=private_key)


def public_jwk(public_key: Ed25519PublicKey, kid: str) -> dict[str, str]:
    """The RFC 8037 JWK of an Ed25519 public key."""
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64url_encode(raw_public_bytes(public_key)),
        "kid": kid,
        "alg": ALGORITHM,
        "use": "sig",
    }


def public_key_from_jwk(jwk: Mapping[str, Any]) -> Ed25519PublicKey:
    """Parse an Ed25519 public JWK; ``ValueError`` when it is anything else."""
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise ValueError("the JWK is not an OKP/Ed25519 key")
    if jwk.get("alg", ALGORITHM) != ALGORITHM:
        raise ValueError("the JWK is not for the EdDSA algorithm")
    if jwk.get("use", "sig") != "sig":
        raise ValueError("the JWK is not a signature key")
    if "d" in jwk:
        # A private JWK handed to a verifier is a leak upstream; refuse to normalise it.
        raise ValueError("the JWK contains private key material")
    x = jwk.get("x")
    if not isinstance(x, str):
        raise ValueError("the JWK has no 'x' member")
    try:
        raw = b64url_decode(x)
    except ValueError as exc:
        raise ValueError("the JWK's 'x' is not base64url") from exc
    if len(raw) != _RAW_KEY_BYTES:
        raise ValueError("the JWK's 'x' is not a 32-byte Ed25519 public key")
    return Ed25519PublicKey.from_public_bytes(raw)
