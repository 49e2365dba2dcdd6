"""Optional bearer-token auth, compared in constant time, on every route except health."""

from __future__ import annotations

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
