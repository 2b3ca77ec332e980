"""Argon2id password hashing: what is stored, what verifies, when to rehash."""

from __future__ import annotations

import dataclasses

import pytest

from services.auth.passwords import Passwords
from tests.fakes.passwords import FAST


@pytest.fixture
def passwords() -> Passwords:
    return Passwords(FAST)


def test_hash_is_salted_argon2id_and_verifies(passwords: Passwords) -> None:
    first = passwords.hash("correct horse battery")
    second = passwords.hash("correct horse battery")
    assert first.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert first != second  # a random salt per hash
    assert "correct horse battery" not in first
    assert passwords.verify(first, "correct horse battery")
    assert passwords.verify(second, "correct horse battery")


def test_wrong_password_does_not_verify(passwords: Passwords) -> None:
    stored = passwords.hash("correct horse battery")
    assert not passwords.verify(stored, "correct horse batterY")
    assert not passwords.verify(stored, "")


def test_corrupt_stored_hash_is_a_mismatch_not_a_crash(passwords: Passwords) -> None:
    assert not passwords.verify("not-a-hash", "whatever password")
    assert passwords.needs_rehash("not-a-hash")


def test_needs_rehash_only_when_parameters_changed(passwords: Passwords) -> None:
    current = passwords.hash("correct horse battery")
    assert not passwords.needs_rehash(current)
    stronger = Passwords(dataclasses.replace(FAST, time_cost=2))
    assert stronger.needs_rehash(current)
    # ... and a hash with other parameters still verifies, so login can upgrade it.
    assert stronger.verify(current, "correct horse battery")


def test_default_parameters_are_argon2id() -> None:
    stored = Passwords().hash("correct horse battery")
    assert stored.startswith("$argon2id$")


def test_verify_dummy_does_a_real_verification_with_the_same_parameters(
    passwords: Passwords, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    real_verify = passwords.verify

    def spy(password_hash: str, password: str) -> bool:
        seen.append(password_hash)
        return real_verify(password_hash, password)

    monkeypatch.setattr(passwords, "verify", spy)
    passwords.verify_dummy("some password")
    assert len(seen) == 1
    # Same cost parameters as a real hash, so the timing matches a real user's.
    prefix = passwords.hash("x").rsplit("$", 2)[0]
    assert seen[0].startswith(prefix + "$")
