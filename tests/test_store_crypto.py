"""API key secrets encrypted at rest with ``BOT_SECRET_KEY`` (bot/store/crypto.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
from cryptography.fernet import Fernet

from bot.config import parse_settings
from bot.errors import ConfigError, StoreError
from bot.store import KeyCipher, SQLiteStore, create_store, secret_key_from_env
from tests.store_contract import FakeClock, StoreContract, key

PASSPHRASE = "correct horse battery staple"
OTHER_PASSPHRASE = "a different passphrase entirely"
FERNET_KEY = Fernet.generate_key().decode()
SECRETS = ("sk-live-alpha-0123456789abcdef", "sk-live-bravo-fedcba9876543210")


@pytest.fixture(scope="module")
def cipher() -> KeyCipher:
    return KeyCipher.from_secret(PASSPHRASE)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock, cipher: KeyCipher) -> AsyncIterator[SQLiteStore]:
    encrypted = SQLiteStore(tmp_path / "data" / "bot.db", clock=clock, cipher=cipher)
    await encrypted.open()
    yield encrypted
    await encrypted.close()


class TestEncryptedSQLiteStoreContract(StoreContract):
    """An encrypting store keeps every promise of the plain one."""


def raw_bytes(path: Path) -> bytes:
    """Everything SQLite keeps on disk for the database: the file, its WAL and shared memory."""
    return b"".join(
        each.read_bytes()
        for each in sorted(path.parent.iterdir())
        if each.name.startswith(path.name)
    )


def stored_secrets(path: Path) -> list[str]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT secret FROM api_keys ORDER BY key_id").fetchall()
    connection.close()
    return [row[0] for row in rows]


async def save_and_close(path: Path, cipher: KeyCipher | None, *secrets: str) -> None:
    store = SQLiteStore(path, cipher=cipher)
    await store.open()
    for index, secret in enumerate(secrets):
        await store.save_key(key(f"k{index}", secret=secret))
    await store.close()


async def load_secrets(path: Path, cipher: KeyCipher | None) -> list[str]:
    store = SQLiteStore(path, cipher=cipher)
    await store.open()
    try:
        return [stored.secret for stored in await store.load_keys()]
    finally:
        await store.close()


@pytest.mark.parametrize(
    "secret_key",
    [PASSPHRASE, FERNET_KEY, f"  {FERNET_KEY}\n"],
    ids=["passphrase", "fernet-key", "fernet-key-with-whitespace"],
)
async def test_keys_round_trip_encrypted_with_a_passphrase_or_a_fernet_key(
    tmp_path: Path, secret_key: str
) -> None:
    path = tmp_path / "bot.db"
    await save_and_close(path, KeyCipher.from_secret(secret_key), *SECRETS)

    assert await load_secrets(path, KeyCipher.from_secret(secret_key)) == list(SECRETS)
    assert all(value.startswith("fernet:") for value in stored_secrets(path))


async def test_a_fernet_key_is_used_as_it_is_not_stretched_like_a_passphrase(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bot.db"
    await save_and_close(path, KeyCipher.from_secret(FERNET_KEY), SECRETS[0])
    token = stored_secrets(path)[0].removeprefix("fernet:")

    assert Fernet(FERNET_KEY.encode()).decrypt(token.encode()).decode() == SECRETS[0]


async def test_the_raw_database_never_contains_a_secret_when_encryption_is_on(
    tmp_path: Path, cipher: KeyCipher
) -> None:
    path = tmp_path / "bot.db"
    store = SQLiteStore(path, cipher=cipher)
    await store.open()
    for round_ in range(5):  # each save replaces the row: old copies must not be plain either
        for index, secret in enumerate(SECRETS):
            await store.save_key(key(f"k{index}", secret=secret, requests=round_))
    await store.delete_key("k1")
    for secret in SECRETS:
        assert secret.encode() not in raw_bytes(path)  # while open: the WAL holds the writes
    await store.close()

    for secret in SECRETS:
        assert secret.encode() not in raw_bytes(path)
    assert await load_secrets(path, cipher) == [SECRETS[0]]


async def test_without_encryption_secrets_are_stored_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    await save_and_close(path, None, SECRETS[0])
    assert stored_secrets(path) == [SECRETS[0]]


async def test_encrypted_keys_without_the_secret_key_are_a_store_error_saying_what_to_set(
    tmp_path: Path, cipher: KeyCipher
) -> None:
    path = tmp_path / "bot.db"
    await save_and_close(path, cipher, SECRETS[0])

    with pytest.raises(StoreError) as raised:
        await load_secrets(path, None)
    assert str(raised.value) == (
        "the stored API keys are encrypted: set BOT_SECRET_KEY to the value used when they "
        "were saved"
    )


async def test_encrypted_keys_with_another_secret_key_are_a_store_error_saying_what_to_set(
    tmp_path: Path, cipher: KeyCipher
) -> None:
    path = tmp_path / "bot.db"
    await save_and_close(path, cipher, SECRETS[0])

    with pytest.raises(StoreError, match="set BOT_SECRET_KEY to the value used when they were"):
        await load_secrets(path, KeyCipher.from_secret(OTHER_PASSPHRASE))
    with pytest.raises(StoreError, match="set BOT_SECRET_KEY to the value used when they were"):
        await load_secrets(path, KeyCipher.from_secret(Fernet.generate_key().decode()))
    assert await load_secrets(path, cipher) == [SECRETS[0]]


async def test_plain_keys_are_encrypted_in_place_when_the_secret_key_is_first_set(
    tmp_path: Path, cipher: KeyCipher
) -> None:
    path = tmp_path / "bot.db"
    removed = [f"sk-live-removed-{index:04}-0123456789" for index in range(28)]
    plain = SQLiteStore(path)
    await plain.open()
    # As on a platform whose SQLite is built without SECURE_DELETE: every replaced or deleted
    # row leaves its plain text in the file's free space (here whole pages of removed keys).
    plain._db().execute("PRAGMA secure_delete=OFF")
    for round_ in range(2):
        for index, secret in enumerate((*SECRETS, *removed)):
            await plain.save_key(key(f"k{index:02}", secret=secret, requests=round_))
    for index in range(len(SECRETS), len(SECRETS) + len(removed)):
        await plain.delete_key(f"k{index:02}")
    await plain.close()
    assert all(secret.encode() in raw_bytes(path) for secret in removed)

    with structlog.testing.capture_logs() as logs:
        migrated = await load_secrets(path, cipher)

    assert migrated == list(SECRETS)
    assert all(value.startswith("fernet:") for value in stored_secrets(path))
    for secret in (*SECRETS, *removed):
        assert secret.encode() not in raw_bytes(path)
    encrypted = [entry for entry in logs if entry["event"] == "keys_encrypted"]
    assert len(encrypted) == 1
    assert encrypted[0]["count"] == 2
    assert not any(secret in repr(logs) for secret in SECRETS)


async def test_only_plain_keys_are_encrypted_and_the_migration_runs_once(
    tmp_path: Path, cipher: KeyCipher
) -> None:
    path = tmp_path / "bot.db"
    await save_and_close(path, cipher, SECRETS[0])
    store = SQLiteStore(path)  # an older bot, without BOT_SECRET_KEY, added a plain key
    await store.open()
    await store.save_key(key("k1", secret=SECRETS[1]))
    await store.close()
    sealed_before = stored_secrets(path)[0]

    with structlog.testing.capture_logs() as first:
        assert await load_secrets(path, cipher) == list(SECRETS)
    with structlog.testing.capture_logs() as second:
        assert await load_secrets(path, cipher) == list(SECRETS)

    assert stored_secrets(path)[0] == sealed_before
    assert [entry["count"] for entry in first if entry["event"] == "keys_encrypted"] == [1]
    assert not [entry for entry in second if entry["event"] == "keys_encrypted"]


async def test_plain_keys_are_not_encrypted_with_a_secret_key_that_cannot_open_the_others(
    tmp_path: Path, cipher: KeyCipher
) -> None:
    path = tmp_path / "bot.db"
    await save_and_close(path, cipher, SECRETS[0])
    store = SQLiteStore(path)
    await store.open()
    await store.save_key(key("k1", secret=SECRETS[1]))
    await store.close()

    wrong = SQLiteStore(path, cipher=KeyCipher.from_secret(OTHER_PASSPHRASE))
    with pytest.raises(StoreError, match="set BOT_SECRET_KEY to the value used"):
        await wrong.open()

    assert stored_secrets(path)[1] == SECRETS[1]  # untouched: one table never mixes two keys
    assert await load_secrets(path, cipher) == list(SECRETS)


@pytest.mark.parametrize("value", ["tiny-secret", "fifteen chars!!", " " * 20])
def test_a_secret_key_too_short_is_a_config_error_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        KeyCipher.from_secret(value)
    (problem,) = raised.value.problems
    assert problem.startswith("BOT_SECRET_KEY: is too short")
    assert "16 characters" in problem
    assert "Fernet.generate_key()" in problem
    if value.strip():
        assert value not in problem


def test_a_passphrase_of_sixteen_characters_is_enough() -> None:
    KeyCipher.from_secret("x" * 16)


def test_the_cipher_never_shows_its_key() -> None:
    cipher = KeyCipher.from_secret(FERNET_KEY)
    assert FERNET_KEY not in repr(cipher)
    assert FERNET_KEY not in str(cipher)


def test_the_factory_builds_an_encrypting_store_from_the_secret_key(tmp_path: Path) -> None:
    settings = parse_settings({"store": {"url": "sqlite:///data/x.db"}})
    assert isinstance(
        create_store(settings.store, cwd=tmp_path, secret_key=PASSPHRASE), SQLiteStore
    )
    with pytest.raises(ConfigError, match="BOT_SECRET_KEY: is too short"):
        create_store(settings.store, cwd=tmp_path, secret_key="too short")


async def test_the_factory_without_a_secret_key_stores_plain(tmp_path: Path) -> None:
    settings = parse_settings({"store": {"url": "sqlite:///x.db"}})
    for secret_key in (None, ""):
        store = create_store(settings.store, cwd=tmp_path, secret_key=secret_key)
        await store.open()
        await store.save_key(key("k0", secret=SECRETS[0]))
        await store.close()
        assert stored_secrets(tmp_path / "x.db") == [SECRETS[0]]


def test_the_secret_key_is_read_from_the_environment_and_blank_means_unset() -> None:
    assert secret_key_from_env({"BOT_SECRET_KEY": f" {PASSPHRASE}\n"}) == PASSPHRASE
    assert secret_key_from_env({"BOT_SECRET_KEY": "  "}) is None
    assert secret_key_from_env({}) is None
