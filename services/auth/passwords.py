"""Password hashing with Argon2id (argon2-cffi).

Passwords have little entropy, so they get a slow, memory-hard hash; the cost
parameters are stored inside each hash, which is what lets ``needs_rehash`` upgrade old
hashes at the next successful login. The unit tests pass ``argon2.profiles.CHEAPEST``
so that hashing takes microseconds instead of tens of milliseconds.
"""

from __future__ import annotations

import logging
import secrets

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

log = logging.getLogger(__name__)


class Passwords:
    """Hash and verify passwords; never logs or keeps a password.

    The default parameters are argon2-cffi's (RFC 9106 "low memory": t=3, 64 MiB,
    p=4): about 75 ms and 64 MiB per hash on these machines, which bounds concurrent
    logins per process by memory (size the gRPC thread pool accordingly).
    """

    def __init__(self, parameters: argon2.Parameters | None = None) -> None:
        if parameters is None:
            self._hasher = argon2.PasswordHasher()
        else:
            self._hasher = argon2.PasswordHasher.from_parameters(parameters)
        # A real hash made with the same parameters as every other hash: verifying
        # against it costs exactly as much as verifying a real user's password, so the
        # response time of Login does not reveal whether a username exists.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(32))

    def hash(self, password: str) -> str:
        """Return the PHC-format Argon2id hash (with its random salt) of ``password``."""
        return self._hasher.hash(password)

    def verify(self, password_hash: str, password: str) -> bool:
        """True when ``password`` matches ``password_hash``.

        A stored hash that is not a valid Argon2 hash counts as a mismatch (the user
        cannot log in until the password is reset) rather than an internal error that
        would tell a caller something different happened for this username.
        """
        try:
            return self._hasher.verify(password_hash, password)
        except VerificationError:
            return False
        except InvalidHashError:
            log.warning("a stored password hash is not a valid Argon2 hash")
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        """True when ``password_hash`` was made with other parameters than the current ones."""
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except (InvalidHashError, ValueError):
            return True

    def verify_dummy(self, password: str) -> None:
        """Spend the time of one verification for a user that does not exist."""
        self.verify(self._dummy_hash, password)
