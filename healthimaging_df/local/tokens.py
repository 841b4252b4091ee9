"""Opaque, signed ``nextToken`` values: keyset cursors for search, offsets for the list calls.

A token is ``base64url(json payload) "." base64url(HMAC-SHA256[:18])`` under a per-backend
secret, bound to a digest of the query (or request scope) it was issued for: forged tokens,
tokens of another server and tokens of another query are all ``ValidationException``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

from healthimaging_df.local.errors import ValidationError
from healthimaging_df.local.state import Entry
from healthimaging_df.local.values import MAX_TOKEN

__all__ = ["TokenSigner"]


def _digest(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:24]


class TokenSigner:
    """Issues and checks tokens under one HMAC ``secret``."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def sign(self, payload: dict[str, Any]) -> str:
        """Encode and sign a JSON-serializable payload."""
        body = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).rstrip(
            b"="
        )
        mac = hmac.new(self._secret, body, hashlib.sha256).digest()[:18]
        return (body + b"." + base64.urlsafe_b64encode(mac)).decode("ascii")

    def verify(self, token: Any) -> dict[str, Any]:
        """The payload of a token this signer issued; :class:`ValidationError` otherwise."""
        if not isinstance(token, str) or not 1 <= len(token) <= MAX_TOKEN or not token.isascii():
            raise ValidationError("nextToken is malformed")
        body, sep, mac_text = token.partition(".")
        try:
            mac = base64.urlsafe_b64decode(mac_text.encode() + b"=" * (-len(mac_text) % 4))
        except (binascii.Error, ValueError):
            raise ValidationError("nextToken is malformed") from None
        if not sep or not body:
            raise ValidationError("nextToken is malformed")
        expected = hmac.new(self._secret, body.encode(), hashlib.sha256).digest()[:18]
        if not hmac.compare_digest(mac, expected):
            raise ValidationError("nextToken is invalid: it was not issued by this service")
        try:
            raw = base64.urlsafe_b64decode(body.encode() + b"=" * (-len(body) % 4))
            payload = json.loads(raw)
        except (binascii.Error, ValueError):
            raise ValidationError("nextToken is malformed") from None
        if not isinstance(payload, dict):
            raise ValidationError("nextToken is malformed")
        return payload

    def encode_cursor(self, entry: Entry, canonical: str) -> str:
        """A search token resuming after ``entry`` of the query ``canonical``."""
        return self.sign({"q": _digest(canonical), "c": list(entry)})

    def encode_start(self, canonical: str) -> str:
        """A search token resuming at the start of the query ``canonical`` (``empty_first_page``)."""
        return self.sign({"q": _digest(canonical), "s": 1})

    def decode_cursor(self, token: str, canonical: str) -> Entry | None:
        """The cursor of a search token issued for the query ``canonical`` (None: its start)."""
        payload = self.verify(token)
        if payload.get("q") != _digest(canonical):
            raise ValidationError("nextToken was issued for a different query")
        if payload.get("s") == 1:
            return None
        entry = payload.get("c")
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or entry[0] not in (-1, 0, 1)
            or not isinstance(entry[1], int)
            or not isinstance(entry[2], str)
        ):
            raise ValidationError("nextToken is malformed")
        return (entry[0], entry[1], entry[2])

    def encode_endless(self, serial: int, canonical: str) -> str:
        """A never-repeated token of the query ``canonical`` (``endless_empty_pages`` fault)."""
        return self.sign({"q": _digest(canonical), "e": serial})

    def check_scope(self, token: str, canonical: str) -> None:
        """Check that a token (cursor or endless) was issued here for the query ``canonical``."""
        if self.verify(token).get("q") != _digest(canonical):
            raise ValidationError("nextToken was issued for a different query")

    def encode_offset(self, offset: int, scope: str) -> str:
        """A list token resuming at ``offset`` of the request ``scope``."""
        return self.sign({"q": _digest(scope), "o": offset})

    def decode_offset(self, token: str, scope: str) -> int:
        """The offset of a list token issued for the request ``scope``."""
        payload = self.verify(token)
        if payload.get("q") != _digest(scope):
            raise ValidationError("nextToken was issued for a different request")
        offset = payload.get("o")
        if not isinstance(offset, int) or offset < 0:
            raise ValidationError("nextToken is malformed")
        return offset
