"""Optional bearer-token auth, compared in constant time, on every route except health; and the tag that ties
what a key made (its image URLs) to that key."""

from __future__ import annotations

import hashlib
import hmac

from diffuserve.errors import Unauthorized


class BearerAuth:
    def __init__(self, keys: list[str]) -> None:
        self.keys = [key.encode() for key in keys]

    def check(self, authorization: str | None) -> None:
        if not self.keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing bearer token: send `Authorization: Bearer <key>`")
        candidate = token.strip().encode()
        # Compare against every key without short-circuit so timing reveals neither key nor position.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise Unauthorized("invalid API key")

    def owner_tag(self, authorization: str | None) -> str:
        """The tag of the key that `authorization` carries: 16 hex digits of a hash the key cannot be read back
        from, "" when auth is off. Call after `check`, which ensures the key is one of the keys."""
        if not self.keys:
            return ""
        token = (authorization or "").partition(" ")[2].strip().encode()
        return hashlib.blake2b(token, digest_size=8, person=b"diffuserve-img").hexdigest()
