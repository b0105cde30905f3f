"""Named keys: where a key comes from (a hash, a file, a systemd credential), the rules a
config entry must follow, and the key ring's constant-time matching."""

from __future__ import annotations

import hmac
import textwrap
from pathlib import Path
from typing import Any

import pytest

from neuronctl import keys
from neuronctl.config import ConfigError, KeySpec, load_config
from neuronctl.keys import ADMIN, INFERENCE, KeyRing, new_key, sha256_hex, toml_entry

KEY = "nk-a-key-for-tests"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "neuron.toml"
    path.write_text(textwrap.dedent(text))
    return path


def secret_file(tmp_path: Path, name: str, key: str, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(key + "\n")
    path.chmod(mode)
    return path


def test_a_key_from_each_source_is_held_as_its_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    secret_file(creds, "gw", "nk-from-credential", 0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    keyfile = secret_file(tmp_path, "monitor.key", "nk-from-file", 0o640)
    config = load_config(write(tmp_path, f"""
        [[keys]]
        name = "hashed"
        sha256 = "{sha256_hex(KEY).upper()}"
        roles = ["admin"]
        [[keys]]
        name = "monitor"
        file = "{keyfile}"
        roles = ["read"]
        [[keys]]
        name = "gw"
        credential = "gw"
        roles = ["inference"]
        models = ["qwen*"]
        rpm = 60
        max_concurrent = 2
    """), {})
    assert [k.sha256 for k in config.keys] == [
        sha256_hex(KEY), sha256_hex("nk-from-file"), sha256_hex("nk-from-credential")]
    assert "nk-from" not in repr(config) and sha256_hex(KEY) not in repr(config)
    ring = KeyRing(config)
    assert {n: ring.identify(k) for n, k in (
        ("hashed", KEY), ("monitor", "nk-from-file"), ("gw", "nk-from-credential"))} == {
        "hashed": keys.Principal("hashed", frozenset({ADMIN})),
        "monitor": keys.Principal("monitor", frozenset({"read"})),
        "gw": keys.Principal("gw", frozenset({INFERENCE}), ("qwen*",), 60, 2)}
    assert ring.identify("nk-from-file ") is None and ring.identify(None) is None


@pytest.mark.parametrize(("entry", "key", "says"), [
    ('sha256 = "abc"', "keys[0].sha256", "64 hex digits"),
    ("", "keys[0]", "exactly one of sha256, file or credential, got none"),
    (f'sha256 = "{"a" * 64}"\nfile = "/k"', "keys[0]", "got sha256, file"),
    (f'sha256 = "{"a" * 64}"\nroles = ["root"]', "keys[0].roles[0]", "one of inference"),
    (f'sha256 = "{"a" * 64}"\nroles = []', "keys[0].roles", "at least one"),
    (f'sha256 = "{"a" * 64}"\nmodels = ["a b"]', "keys[0].models[0]", "glob"),
    (f'sha256 = "{"a" * 64}"\nrpm = 0', "keys[0].rpm", "between 1"),
    (f'sha256 = "{"a" * 64}"\nmax_concurrent = -1', "keys[0].max_concurrent", "between 1"),
    ('credential = "../etc/shadow"', "keys[0].credential", "credential name"),
    ('credential = "gw"', "keys[0].credential", "LoadCredential=gw"),
    ('file = "missing.key"', "keys[0].file", "cannot read"),
])
def test_a_malformed_entry_names_its_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         entry: str, key: str, says: str) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    roles = "" if "roles" in entry else 'roles = ["read"]\n'
    path = write(tmp_path, f'[[keys]]\nname = "k"\n{roles}{entry}\n')
    with pytest.raises(ConfigError) as raised:
        load_config(path, {})
    assert raised.value.key == key and says in raised.value.message, str(raised.value)


def test_names_are_unique_and_never_api_key(tmp_path: Path) -> None:
    entry = f'[[keys]]\nname = "k"\nroles = ["read"]\nsha256 = "{"a" * 64}"\n'
    with pytest.raises(ConfigError, match=r"keys\[1\].name: duplicate key name 'k'"):
        load_config(write(tmp_path, entry * 2), {})
    with pytest.raises(ConfigError, match=r"keys\[0\].name"):
        load_config(write(tmp_path, entry.replace('"k"', '"api_key"')), {})
    # Two names for one key: its rights would be whichever entry matched first.
    with pytest.raises(ConfigError, match=r"keys\[1\]: key 'j' is the same key as 'k'"):
        load_config(write(tmp_path, entry + entry.replace('"k"', '"j"')), {})
    import hashlib

    same = entry.replace("a" * 64, hashlib.sha256(b"admin-key").hexdigest())
    with pytest.raises(ConfigError, match=r"api_key: is the same key as \[\[keys\]\] 'k'"):
        load_config(write(tmp_path, 'api_key = "admin-key"\n' + same), {})


def test_a_key_file_readable_by_every_user_is_refused(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "k.key", KEY, 0o644)
    config = write(tmp_path, f'[[keys]]\nname = "k"\nroles = ["read"]\nfile = "{path}"\n')
    with pytest.raises(ConfigError, match=r"keys\[0\].file: .* every user .*chmod o-rwx"):
        load_config(config, {})
    path.chmod(0o640)  # root:neuron 640, as api_key_file
    assert load_config(config, {}).keys[0].sha256 == sha256_hex(KEY)
    path.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(config, {})


def test_a_wrong_sha256_is_never_quoted(tmp_path: Path) -> None:
    """A plaintext key pasted where its hash belongs must not reach the journal."""
    path = write(tmp_path, f'[[keys]]\nname = "k"\nroles = ["read"]\nsha256 = "{KEY}"\n')
    with pytest.raises(ConfigError) as raised:
        load_config(path, {})
    assert KEY not in str(raised.value)


def test_matching_compares_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each key is compared with hmac.compare_digest, all of them whichever matches, so
    the time taken says nothing about which key (or how much of one) was right."""
    from neuronctl.config import NeuronConfig

    config = NeuronConfig(api_key="plain-admin", keys=tuple(
        KeySpec(f"k{i}", ("read",), sha256=sha256_hex(f"key-{i}")) for i in range(5)))
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", spy)
    ring = KeyRing(config)
    for presented in ("plain-admin", "key-0", "key-4", "wrong"):
        calls.clear()
        ring.identify(presented)
        assert len(calls) == 6, presented
        # Digests of equal length: compare_digest's time does not depend on the input's.
        assert all(isinstance(a, bytes) and len(a) == len(b) == 32 for a, b in calls)
    assert ring.identify("plain-admin") == keys.Principal("api_key", frozenset({ADMIN}))


def test_scope_globs_and_roles() -> None:
    gw = keys.Principal("gw", frozenset({INFERENCE}), ("qwen*", "gemma-?b"))
    assert gw.may_use("qwen3-8b") and gw.may_use("gemma-2b")
    assert not gw.may_use("llama") and not gw.may_use("gemma-27b")
    assert gw.has(INFERENCE) and not gw.has("read") and not gw.has(ADMIN)
    admin = keys.Principal("root", frozenset({ADMIN}), ("qwen*",))
    assert admin.may_use("llama") and admin.has("read")


def test_a_new_key_and_its_entry_load_as_the_same_key(tmp_path: Path) -> None:
    key = new_key()
    assert key.startswith("nk-") and len(key) > 40 and key != new_key()
    entry = toml_entry("gw", key, ["inference"], ["qwen*"], 600, 4)
    assert key not in entry
    config = load_config(write(tmp_path, entry), {})
    principal = KeyRing(config).identify(key)
    assert principal == keys.Principal("gw", frozenset({INFERENCE}), ("qwen*",), 600, 4)
