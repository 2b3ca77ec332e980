"""Access tokens: EdDSA-signed JWTs, issued by the auth service and verified everywhere.

The verifier is the security boundary of every other service, so it is deliberately
narrow: one algorithm (EdDSA; ``none``, HMAC and RSA/ECDSA tokens are refused before any
key is looked at, which rules out algorithm-confusion attacks), one issuer, one
audience, one token type, and the claims exp/iat/sub/iss/aud/scope all required.
Keys are found by the ``kid`` header through a ``PublicKeySource``; the
``CachingKeySource`` re-reads the key table when a token names a kid it has not seen
(a key rotated in another region), at most once per interval so that a flood of
forged kids cannot turn into a flood of database queries.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.auth.keys import ALGORITHM, SigningKey
from services.common import errors
from services.common.principal import Principal

log = logging.getLogger(__name__)

# RFC 9068 media type of JWT access tokens: stops any other JWT that might ever be
# signed with these keys (an ID token, say) from being accepted as an access token.
TOKEN_TYPE = "at+jwt"  # noqa: S105 - a media type, not a secret
REQUIRED_CLAIMS = ["exp", "iat", "sub", "iss", "aud", "scope"]
# Far above any token we issue; refuses absurd inputs before parsing them.
MAX_TOKEN_LENGTH = 8192

TOKEN_EXPIRED = "TOKEN_EXPIRED"  # noqa: S105 - an error reason, not a secret
TOKEN_INVALID = "TOKEN_INVALID"  # noqa: S105 - an error reason, not a secret
UNKNOWN_SIGNING_KEY = "UNKNOWN_SIGNING_KEY"


def _epoch_seconds(moment: datetime) -> int:
    if moment.tzinfo is None:
        # A naive datetime would be read in the host's local time zone.
        raise ValueError("the issue time must be timezone-aware")
    return int(moment.timestamp())


class TokenIssuer:
    """Signs access tokens for one issuer and audience."""

    def __init__(self, issuer: str, audience: str, ttl_seconds: int = 900) -> None:
        if not issuer or not audience:
            raise ValueError("issuer and audience must not be empty")
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self.issuer = issuer
        self.audience = audience
        self.ttl_seconds = ttl_seconds

    def issue(self, subject: str, scopes: Iterable[str], key: SigningKey, now: datetime) -> str:
        """Return a signed JWT for ``subject`` carrying ``scopes``, valid from ``now``."""
        issued_at = _epoch_seconds(now)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            # Sorted so that the same grant always produces the same claim.
            "scope": " ".join(sorted(set(scopes))),
            "iat": issued_at,
            "nbf": issued_at,
            "exp": issued_at + self.ttl_seconds,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(
            claims,
            key.private_key,
            algorithm=ALGORITHM,
            headers={"kid": key.kid, "typ": TOKEN_TYPE},
        )


class PublicKeySource(Protocol):
    """Where a verifier finds the public key a token's ``kid`` names."""

    def get(self, kid: str) -> Ed25519PublicKey | None: ...


def _invalid(message: str) -> errors.Unauthenticated:
    return errors.Unauthenticated(f"the access token is invalid: {message}", reason=TOKEN_INVALID)


class TokenVerifier:
    """Verifies access tokens and turns them into the calling ``Principal``."""

    def __init__(
        self, issuer: str, audience: str, keys: PublicKeySource, leeway_seconds: int = 5
    ) -> None:
        self._issuer = issuer
        self._audience = audience
        self._keys = keys
        self._leeway = leeway_seconds
        # A private instance so that nobody's change of PyJWT's global defaults
        # (e.g. verify_signature=False in some test) can weaken our checks.
        self._jwt = jwt.PyJWT()

    def verify(self, token: str) -> Principal:
        """Return the principal of a valid token; raise ``errors.Unauthenticated`` otherwise.

        Reasons: TOKEN_EXPIRED (ask for a new one), UNKNOWN_SIGNING_KEY (signed by a key
        this service does not trust) and TOKEN_INVALID (everything else). A key source
        that cannot reach its keys raises ``errors.Unavailable``, which callers should
        pass on: the client may retry, its token is not at fault.
        """
        if not token:
            raise _invalid("it is empty")
        if len(token) > MAX_TOKEN_LENGTH:
            raise _invalid("it is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _invalid("it is not a well-formed JWT") from None
        if header.get("alg") != ALGORITHM:
            raise _invalid(f"only {ALGORITHM}-signed tokens are accepted")
        if header.get("typ") != TOKEN_TYPE:
            raise _invalid(f"the token type is not {TOKEN_TYPE!r}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _invalid("the header has no key id (kid)")
        key = self._keys.get(kid)
        if key is None:
            raise errors.Unauthenticated(
                "the access token was signed by an unknown key",
                reason=UNKNOWN_SIGNING_KEY,
                metadata={"kid": kid[:64]},
            )
        try:
            claims = self._jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={
                    "require": REQUIRED_CLAIMS,
                    "strict_aud": True,
                    "verify_signature": True,
                    "verify_exp": True,
                    "verify_iat": True,
                    "verify_nbf": True,
                    "verify_iss": True,
                    "verify_aud": True,
                    "verify_sub": True,
                },
            )
        except jwt.ExpiredSignatureError:
            raise errors.Unauthenticated(
                "the access token has expired", reason=TOKEN_EXPIRED
            ) from None
        except jwt.InvalidSignatureError:
            raise _invalid("the signature does not verify") from None
        except jwt.InvalidAudienceError:
            raise _invalid("it is not meant for this audience") from None
        except jwt.InvalidIssuerError:
            raise _invalid("it was not issued by the expected issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _invalid(f"the {exc.claim!r} claim is missing") from None
        except jwt.ImmatureSignatureError:
            raise _invalid("it is not valid yet") from None
        except jwt.InvalidTokenError:
            raise _invalid("it could not be decoded") from None
        subject = claims["sub"]
        scope = claims["scope"]
        if not isinstance(subject, str) or not subject:
            raise _invalid("the subject is empty")
        if not isinstance(scope, str):
            raise _invalid("the scope claim is not a string")
        return Principal(name=subject, scopes=frozenset(scope.split()))


class CachingKeySource:
    """A thread-safe ``PublicKeySource`` over a function that loads every trusted key.

    * Known kids are answered from memory without locking.
    * An unknown kid triggers a reload, at most once per ``min_refresh_interval``
      seconds (process-wide): tokens signed with a freshly rotated key verify at once,
      while forged kids cost at most one query per interval.
    * The whole set is reloaded once it is ``max_age`` seconds old, so that retired keys
      stop verifying within that time; if that reload fails the old set stays in use
      (a database blip must not log everybody out).
    * If the very first load, or a reload for an unknown kid, fails, ``get`` raises
      ``errors.Unavailable`` (retryable) rather than calling a good token invalid.
    """

    def __init__(
        self,
        load_all: Callable[[], dict[str, Ed25519PublicKey]],
        min_refresh_interval: float = 1.0,
        *,
        max_age: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load_all = load_all
        self._min_interval = min_refresh_interval
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._loaded_at: float | None = None  # time of the last successful load
        self._attempted_at: float | None = None  # time of the last load attempt
        self._last_failed = False

    def get(self, kid: str) -> Ed25519PublicKey | None:
        keys, loaded_at = self._keys, self._loaded_at
        now = self._clock()
        if loaded_at is not None and now - loaded_at < self._max_age and kid in keys:
            return keys[kid]
        if kid in keys and not self._lock.acquire(blocking=False):
            # Another thread is already refreshing a stale set: a known key stays good
            # meanwhile. (Waiting would stall every call for as long as the database
            # takes to answer, e.g. the seconds of a leader failover.)
            return keys[kid]
        if kid in keys:
            self._lock.release()
        with self._lock:
            now = self._clock()
            fresh = self._loaded_at is not None and now - self._loaded_at < self._max_age
            if fresh and kid in self._keys:
                # Another thread reloaded while we waited for the lock.
                return self._keys[kid]
            if self._may_reload(now):
                self._reload(now, keep_stale=self._loaded_at is not None and kid in self._keys)
            elif self._last_failed and kid not in self._keys:
                raise self._unavailable()
            return self._keys.get(kid)

    def _may_reload(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self._min_interval

    def _reload(self, now: float, *, keep_stale: bool) -> None:
        self._attempted_at = now
        try:
            keys = dict(self._load_all())
        except Exception as exc:
            self._last_failed = True
            if keep_stale:
                log.warning("reloading signing keys failed, keeping the cached ones: %s", exc)
                return
            log.warning("loading signing keys failed: %s", exc)
            raise self._unavailable() from exc
        self._last_failed = False
        # Replace, never mutate: lock-free readers see either the old or the new dict.
        self._keys = keys
        self._loaded_at = now

    @staticmethod
    def _unavailable() -> errors.Unavailable:
        return errors.Unavailable(
            "the token signing keys cannot be loaded right now", reason="SIGNING_KEYS_UNAVAILABLE"
        )
