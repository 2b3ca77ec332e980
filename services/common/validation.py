"""Checks of request fields shared by the servicers; each failure names its proto field."""

from __future__ import annotations

import re
import uuid

from services.common.errors import Violations

REQUEST_ID_MAX = 128
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_REQUEST_ID = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces
_OWNER = re.compile(r"^(users|partners)/[A-Za-z0-9_.-]{1,64}$")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100


def parse_uuid(v: Violations, field: str, value: str) -> uuid.UUID:
    """Return the UUID, or record a violation and return the nil UUID."""
    if not value:
        v.add(field, "is required")
        return uuid.UUID(int=0)
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        v.add(field, "must be a UUID such as 7c0b5a4e-3f0a-4d5e-9a43-2b1e8f6d9c10")
        return uuid.UUID(int=0)
    if str(parsed) != value.lower():
        v.add(field, "must be a UUID in its canonical hyphenated form")
    return parsed


def check_request_id(v: Violations, value: str) -> None:
    if not value:
        v.add("request_id", "is required: a unique id per request makes retries safe (AIP-155)")
    elif len(value) > REQUEST_ID_MAX:
        v.add("request_id", f"must be at most {REQUEST_ID_MAX} characters")
    elif not _REQUEST_ID.match(value):
        v.add("request_id", "must be printable ASCII without spaces")


def check_currency(v: Violations, value: str) -> None:
    if not _CURRENCY.match(value):
        v.add("currency_code", "must be an upper-case ISO-4217 code such as USD")


def check_text(v: Violations, field: str, value: str, max_len: int) -> None:
    if len(value) > max_len:
        v.add(field, f"must be at most {max_len} characters")
    if any(ord(c) < 0x20 and c not in "\t\n" for c in value):
        v.add(field, "must not contain control characters")


def check_owner(v: Violations, field: str, value: str) -> None:
    if value and not _OWNER.match(value):
        v.add(field, "must be empty or a principal name such as users/alice or partners/mbp_x")


def page_size(v: Violations, value: int) -> int:
    if value < 0 or value > MAX_PAGE_SIZE:
        v.add("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
        return DEFAULT_PAGE_SIZE
    return value or DEFAULT_PAGE_SIZE
