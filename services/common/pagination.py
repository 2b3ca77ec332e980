"""Opaque page tokens (AIP-158) over keyset cursors.

A token is base64url(JSON) of the last row's (created_at, id) plus a digest of the
query it belongs to, so a token replayed with a different filter is rejected instead
of silently returning the wrong page. Tokens carry no secrets: the filter is checked
again on every call.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from datetime import datetime

from services.common.errors import Violations
from services.ledger.ports import Cursor


def _digest(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:16]


def encode(cursor: Cursor | None, query: str) -> str:
    if cursor is None:
        return ""
    created_at, row_id = cursor
    body = json.dumps({"t": created_at.isoformat(), "id": str(row_id), "q": _digest(query)})
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode(v: Violations, token: str, query: str) -> Cursor | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        cursor = (datetime.fromisoformat(body["t"]), uuid.UUID(body["id"]))
        same_query = body["q"] == _digest(query)
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        v.add("page_token", "is not a token returned by this method")
        return None
    if not same_query:
        v.add("page_token", "belongs to a different query")
        return None
    return cursor
