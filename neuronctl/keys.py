"""Who holds a key, and what it may do: the key ring of a config (`api_key` and
`[[keys]]`), matched in constant time, and new keys for `neuronctl key new`.

No aiohttp: the CLI makes keys with it, the API's middleware (api/auth.py) asks it who
sent a request. A key is only ever held as its SHA-256; the one plaintext key the ring
keeps is `api_key`'s, which the config holds anyway.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from .config import API_KEY_NAME, KeySpec, NeuronConfig

INFERENCE, READ, ADMIN = "inference", "read", "admin"
# A route any valid key may use whatever its roles (the dashboard asks who it is).
ANY_KEY = "any key"
KEY_PREFIX = "nk-"  # tells a leaked string apart as a neuron key (secret scanners)


@dataclass(frozen=True)
class Principal:
    """The holder of a key: the name logs, metrics and /keys/usage know it by."""

    name: str
    roles: frozenset[str]
    models: tuple[str, ...] = ()  # globs; empty: every model
    rpm: int | None = None
    max_concurrent: int | None = None

    def has(self, role: str) -> bool:
        return role == ANY_KEY or ADMIN in self.roles or role in self.roles

    def may_use(self, model_id: str) -> bool:
        """Whether this key's scope holds `model_id` (an admin key's always does)."""
        if not self.models or ADMIN in self.roles:
            return True
        return any(fnmatch.fnmatchcase(model_id, glob) for glob in self.models)


# What a request without keys configured acts as: nothing is checked.
UNRESTRICTED = Principal("", frozenset({ADMIN}))


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeyRing:
    """The keys of one config. `identify` compares against every key, always all of them
    and each in constant time, so how long it takes says nothing about which key (or how
    much of one) matched."""

    def __init__(self, config: NeuronConfig) -> None:
        self._entries: list[tuple[bytes, Principal]] = []
        if config.api_key is not None:
            self._entries.append((_digest(config.api_key),
                                  Principal(API_KEY_NAME, frozenset({ADMIN}))))
        for spec in config.keys:
            assert spec.sha256 is not None, "keys resolved by load_config"
            self._entries.append((bytes.fromhex(spec.sha256), principal_of(spec)))

    @property
    def open(self) -> bool:
        """No key configured: every route is open, as before keys existed."""
        return not self._entries

    def identify(self, presented: str | None) -> Principal | None:
        if presented is None:
            return None
        given = _digest(presented)
        found: Principal | None = None
        for digest, principal in self._entries:
            if hmac.compare_digest(given, digest) and found is None:
                found = principal
        return found

    def names(self) -> list[str]:
        return [p.name for _, p in self._entries]


def principal_of(spec: KeySpec) -> Principal:
    return Principal(spec.name, frozenset(spec.roles), spec.models, spec.rpm,
                     spec.max_concurrent)


def new_key() -> str:
    """A fresh key: 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def toml_entry(name: str, key: str, roles: list[str], models: list[str],
               rpm: int | None = None, max_concurrent: int | None = None) -> str:
    """The `[[keys]]` entry for `key`, holding its hash only."""

    def array(items: list[str]) -> str:
        return "[" + ", ".join(f'"{item}"' for item in items) + "]"

    lines = ["[[keys]]", f'name = "{name}"', f'sha256 = "{sha256_hex(key)}"',
             f"roles = {array(roles)}"]
    if models:
        lines.append(f"models = {array(models)}")
    if rpm is not None:
        lines.append(f"rpm = {rpm}")
    if max_concurrent is not None:
        lines.append(f"max_concurrent = {max_concurrent}")
    return "\n".join(lines) + "\n"
