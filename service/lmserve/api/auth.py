"""API keys: loaded once, kept only as sha256 digests, checked in constant time.

Keys come from `--api-key-file` (one per line; blank lines and `#` comments skipped) and from
`ServeConfig.api_keys` (which the config layer fills from LMSERVE_API_KEYS). With no key configured the
service is open; app.py logs a warning at startup.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from lmserve.api.errors import APIError

OPEN_KEY_ID = "anonymous"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def read_key_file(path: str | Path) -> list[str]:
    keys: list[str] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


@dataclass(frozen=True)
class KeyStore:
    """The configured keys' digests. `key_id` (a digest prefix) names a key in logs and rate limits."""

    digests: tuple[bytes, ...] = ()

    @classmethod
    def from_keys(cls, keys: list[str] | tuple[str, ...]) -> KeyStore:
        unique = dict.fromkeys(_digest(k) for k in keys if k)
        return cls(tuple(unique))

    @classmethod
    def from_sources(cls, api_keys: tuple[str, ...] = (), api_key_file: str | None = None) -> KeyStore:
        keys = list(api_keys)
        if api_key_file:
            keys.extend(read_key_file(api_key_file))
        return cls.from_keys(keys)

    @property
    def is_enabled(self) -> bool:
        return bool(self.digests)

    def authenticate(self, authorization: str | None) -> str:
        """The key id for an `Authorization` header value; raises APIError(invalid_api_key).

        Compares against every stored digest without stopping early, so timing does not tell which key
        (or how many) matched.
        """
        if not self.is_enabled:
            return OPEN_KEY_ID
        token = parse_bearer(authorization)
        if token is None:
            raise unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        presented = _digest(token)
        matched: bytes | None = None
        for stored in self.digests:
            if hmac.compare_digest(presented, stored):
                matched = stored
        if matched is None:
            raise unauthorized("Invalid API key.")
        return "key-" + matched.hex()[:16]


def parse_bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def unauthorized(message: str) -> APIError:
    return APIError(message, "invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="lmserve"'})
