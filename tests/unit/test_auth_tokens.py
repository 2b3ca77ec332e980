"""Access tokens: what the issuer signs, what the verifier refuses, how keys are cached."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.auth.keys import SigningKey, b64url_encode, generate_signing_key, raw_public_bytes
from services.auth.tokens import CachingKeySource, TokenIssuer, TokenVerifier
from services.common import errors
from services.common.principal import Principal

ISSUER = "https://auth.meshbank.test"
AUDIENCE = "meshbank"


class DictKeys:
    """A PublicKeySource over a dict that records every lookup."""

    def __init__(self, *signing_keys: SigningKey) -> None:
        self.keys = {k.kid: k.public_key for k in signing_keys}
        self.lookups: list[str] = []

    def get(self, kid: str) -> Ed25519PublicKey | None:
        self.lookups.append(kid)
        return self.keys.get(kid)


@pytest.fixture
def key() -> SigningKey:
    return generate_signing_key()


@pytest.fixture
def source(key: SigningKey) -> DictKeys:
    return DictKeys(key)


@pytest.fixture
def verifier(source: DictKeys) -> TokenVerifier:
    return TokenVerifier(ISSUER, AUDIENCE, source)


def now() -> datetime:
    return datetime.now(UTC)


def issue(
    key: SigningKey,
    *,
    at: datetime | None = None,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    ttl: int = 900,
) -> str:
    return TokenIssuer(issuer, audience, ttl).issue(
        "users/alice", ["transfers.write", "accounts.read"], key, at or now()
    )


def segment(obj: dict[str, Any]) -> str:
    return b64url_encode(json.dumps(obj).encode())


def good_claims() -> dict[str, Any]:
    t = int(time.time())
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "users/mallory",
        "scope": "accounts.admin",
        "iat": t,
        "nbf": t,
        "exp": t + 600,
        "jti": "x",
    }


def sign_eddsa(key: SigningKey, claims: dict[str, Any], **header: Any) -> str:
    """A token signed with a real key by PyJWT directly, bypassing our issuer's choices."""
    return jwt.encode(
        claims,
        key.private_key,
        algorithm="EdDSA",
        headers={"kid": key.kid, "typ": "at+jwt", **header},
    )


def expect_unauthenticated(verifier: TokenVerifier, token: str, reason: str) -> str:
    with pytest.raises(errors.Unauthenticated) as caught:
        verifier.verify(token)
    assert caught.value.reason == reason, caught.value.message
    return caught.value.message


# -- issue / verify ----------------------------------------------------------------------


def test_issued_token_verifies_to_the_principal(key: SigningKey, verifier: TokenVerifier) -> None:
    principal = verifier.verify(issue(key))
    assert principal == Principal(
        name="users/alice", scopes=frozenset({"accounts.read", "transfers.write"})
    )


def test_issued_token_header_and_claims(key: SigningKey) -> None:
    at = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    token = issue(key, at=at, ttl=600)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "kid": key.kid, "typ": "at+jwt"}
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == ISSUER
    assert claims["aud"] == AUDIENCE
    assert claims["sub"] == "users/alice"
    assert claims["scope"] == "accounts.read transfers.write"
    assert claims["iat"] == claims["nbf"] == int(at.timestamp())
    assert claims["exp"] == int(at.timestamp()) + 600
    assert len(claims["jti"]) == 32
    other = jwt.decode(issue(key, at=at), options={"verify_signature": False})
    assert other["jti"] != claims["jti"]


def test_issuer_refuses_naive_datetimes(key: SigningKey) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        TokenIssuer(ISSUER, AUDIENCE).issue("users/a", [], key, datetime(2030, 1, 1))


def test_expired_token(key: SigningKey, verifier: TokenVerifier) -> None:
    token = issue(key, at=now() - timedelta(seconds=900 + 60))
    message = expect_unauthenticated(verifier, token, "TOKEN_EXPIRED")
    assert "expired" in message


def test_leeway_tolerates_small_clock_skew(key: SigningKey, verifier: TokenVerifier) -> None:
    # Expired two seconds ago: inside the 5 s leeway.
    token = issue(key, at=now() - timedelta(seconds=900 + 2))
    assert verifier.verify(token).name == "users/alice"


def test_token_from_the_future_is_invalid(key: SigningKey, verifier: TokenVerifier) -> None:
    token = issue(key, at=now() + timedelta(minutes=5))
    message = expect_unauthenticated(verifier, token, "TOKEN_INVALID")
    assert "not valid yet" in message


def test_wrong_issuer(key: SigningKey, verifier: TokenVerifier) -> None:
    token = issue(key, issuer="https://evil.example")
    assert "issuer" in expect_unauthenticated(verifier, token, "TOKEN_INVALID")


def test_wrong_audience(key: SigningKey, verifier: TokenVerifier) -> None:
    token = issue(key, audience="another-service")
    assert "audience" in expect_unauthenticated(verifier, token, "TOKEN_INVALID")


def test_audience_list_is_refused(key: SigningKey, verifier: TokenVerifier) -> None:
    claims = {**good_claims(), "aud": [AUDIENCE, "other"]}
    expect_unauthenticated(verifier, sign_eddsa(key, claims), "TOKEN_INVALID")


def test_alg_none_is_refused_without_a_key_lookup(
    key: SigningKey, source: DictKeys, verifier: TokenVerifier
) -> None:
    header = {"alg": "none", "typ": "at+jwt", "kid": key.kid}
    token = f"{segment(header)}.{segment(good_claims())}."
    message = expect_unauthenticated(verifier, token, "TOKEN_INVALID")
    assert "EdDSA" in message
    assert source.lookups == []


@pytest.mark.parametrize("secret_form", ["raw", "pem", "jwk-x"])
def test_hs256_signed_with_the_public_key_is_refused(
    key: SigningKey, verifier: TokenVerifier, secret_form: str
) -> None:
    # Algorithm confusion: an attacker who knows the public key makes an HMAC with it.
    public = key.public_key
    secret = {
        "raw": raw_public_bytes(public),
        "pem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "jwk-x": key.public_jwk()["x"].encode(),
    }[secret_form]
    signing_input = f"{segment({'alg': 'HS256', 'typ': 'at+jwt', 'kid': key.kid})}." + segment(
        good_claims()
    )
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64url_encode(mac)}"
    expect_unauthenticated(verifier, token, "TOKEN_INVALID")


def test_tampered_payload_fails_the_signature(key: SigningKey, verifier: TokenVerifier) -> None:
    header, _, signature = issue(key).split(".")
    forged_payload = segment({**good_claims(), "sub": "users/alice"})
    token = f"{header}.{forged_payload}.{signature}"
    message = expect_unauthenticated(verifier, token, "TOKEN_INVALID")
    assert "signature" in message


def test_tampered_signature(key: SigningKey, verifier: TokenVerifier) -> None:
    header, payload, signature = issue(key).split(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    token = f"{header}.{payload}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"
    expect_unauthenticated(verifier, token, "TOKEN_INVALID")


def test_signed_by_another_key_under_a_known_kid(key: SigningKey, verifier: TokenVerifier) -> None:
    impostor = SigningKey(kid=key.kid, private_key=generate_signing_key().private_key)
    expect_unauthenticated(verifier, issue(impostor), "TOKEN_INVALID")


def test_unknown_kid(verifier: TokenVerifier) -> None:
    stranger = generate_signing_key()
    message = expect_unauthenticated(verifier, issue(stranger), "UNKNOWN_SIGNING_KEY")
    assert "unknown key" in message


def test_missing_kid(key: SigningKey, verifier: TokenVerifier) -> None:
    token = jwt.encode(good_claims(), key.private_key, algorithm="EdDSA", headers={"typ": "at+jwt"})
    assert "kid" in expect_unauthenticated(verifier, token, "TOKEN_INVALID")


def test_wrong_token_type(key: SigningKey, verifier: TokenVerifier) -> None:
    token = sign_eddsa(key, good_claims(), typ="JWT")
    assert "type" in expect_unauthenticated(verifier, token, "TOKEN_INVALID")


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "iss", "aud", "scope"])
def test_required_claims(key: SigningKey, verifier: TokenVerifier, claim: str) -> None:
    claims = good_claims()
    del claims[claim]
    message = expect_unauthenticated(verifier, sign_eddsa(key, claims), "TOKEN_INVALID")
    assert claim in message


@pytest.mark.parametrize(
    ("claim", "value"), [("sub", ""), ("sub", 42), ("scope", ["accounts.read"])]
)
def test_malformed_claims(key: SigningKey, verifier: TokenVerifier, claim: str, value: Any) -> None:
    claims = {**good_claims(), claim: value}
    expect_unauthenticated(verifier, sign_eddsa(key, claims), "TOKEN_INVALID")


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "x" * 9000])
def test_not_a_jwt(verifier: TokenVerifier, token: str) -> None:
    expect_unauthenticated(verifier, token, "TOKEN_INVALID")


def test_a_token_with_no_scopes_has_an_empty_scope_set(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    token = TokenIssuer(ISSUER, AUDIENCE).issue("partners/p", [], key, now())
    assert verifier.verify(token) == Principal("partners/p", frozenset())


# -- CachingKeySource --------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class CountingLoader:
    def __init__(self, *signing_keys: SigningKey) -> None:
        self.keys = {k.kid: k.public_key for k in signing_keys}
        self.calls = 0
        self.fail = False

    def __call__(self) -> dict[str, Ed25519PublicKey]:
        self.calls += 1
        if self.fail:
            raise ConnectionError("database down")
        return dict(self.keys)


def test_nothing_is_loaded_before_the_first_lookup(key: SigningKey) -> None:
    loader = CountingLoader(key)
    CachingKeySource(loader)
    assert loader.calls == 0


def test_known_kids_are_served_from_the_cache(key: SigningKey) -> None:
    loader = CountingLoader(key)
    cache = CachingKeySource(loader, clock=FakeClock())
    for _ in range(50):
        assert cache.get(key.kid) is loader.keys[key.kid]
    assert loader.calls == 1


def test_unknown_kid_reloads_at_most_once_per_interval(key: SigningKey) -> None:
    loader = CountingLoader(key)
    clock = FakeClock()
    cache = CachingKeySource(loader, min_refresh_interval=1.0, clock=clock)
    assert cache.get(key.kid) is not None
    for _ in range(20):
        assert cache.get("forged-kid") is None
    assert loader.calls == 1  # the first load happened just now: no reload yet
    clock.t += 1.0
    assert cache.get("forged-kid") is None
    assert cache.get("forged-kid") is None
    assert loader.calls == 2


def test_a_rotated_key_is_found_by_reloading(key: SigningKey) -> None:
    loader = CountingLoader(key)
    clock = FakeClock()
    cache = CachingKeySource(loader, clock=clock)
    assert cache.get(key.kid) is not None
    rotated = generate_signing_key()
    loader.keys[rotated.kid] = rotated.public_key
    clock.t += 1.5
    assert cache.get(rotated.kid) == rotated.public_key
    # and a verifier over the cache accepts tokens of the new key
    verifier = TokenVerifier(ISSUER, AUDIENCE, cache)
    assert verifier.verify(issue(rotated)).name == "users/alice"


def test_retired_keys_drop_out_after_max_age(key: SigningKey) -> None:
    loader = CountingLoader(key)
    clock = FakeClock()
    cache = CachingKeySource(loader, clock=clock, max_age=300.0)
    assert cache.get(key.kid) is not None
    del loader.keys[key.kid]
    clock.t += 299.0
    assert cache.get(key.kid) is not None
    clock.t += 1.0
    assert cache.get(key.kid) is None


def test_failed_first_load_is_unavailable_not_invalid(key: SigningKey) -> None:
    loader = CountingLoader(key)
    loader.fail = True
    clock = FakeClock()
    cache = CachingKeySource(loader, clock=clock)
    with pytest.raises(errors.Unavailable):
        cache.get(key.kid)
    with pytest.raises(errors.Unavailable):  # still failing, within the interval: no query
        cache.get(key.kid)
    assert loader.calls == 1
    loader.fail = False
    clock.t += 1.0
    assert cache.get(key.kid) is not None


def test_failed_refresh_keeps_serving_cached_keys(key: SigningKey) -> None:
    loader = CountingLoader(key)
    clock = FakeClock()
    cache = CachingKeySource(loader, clock=clock, max_age=10.0)
    assert cache.get(key.kid) is not None
    loader.fail = True
    clock.t += 11.0
    assert cache.get(key.kid) is loader.keys[key.kid]
    with pytest.raises(errors.Unavailable):
        cache.get("a-kid-we-could-not-look-up")


def test_concurrent_unknown_kids_cause_one_load(key: SigningKey) -> None:
    calls = 0
    gate = threading.Event()

    def slow_loader() -> dict[str, Ed25519PublicKey]:
        nonlocal calls
        calls += 1
        gate.wait(1.0)
        return {key.kid: key.public_key}

    cache = CachingKeySource(slow_loader, min_refresh_interval=60.0)
    results: list[Ed25519PublicKey | None] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get("unknown"))) for _ in range(16)
    ]
    for t in threads:
        t.start()
    time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join()
    assert calls == 1
    assert results == [None] * 16
    assert cache.get(key.kid) == key.public_key
    assert calls == 1
