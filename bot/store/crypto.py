"""Optional encryption of the stored API keys, keyed by the ``BOT_SECRET_KEY`` environment variable.

Without ``BOT_SECRET_KEY`` a key's secret is stored as it is (the SQLite file is mode 0600). With
it, every secret is stored as ``fernet:<token>`` (:mod:`cryptography.fernet`: AES-128-CBC with an
HMAC-SHA256, so a wrong key is detected, never silently decrypted into garbage). The goal is that a
copy of the database file (a backup, a stolen disk, a file shared to debug) is useless without the
variable, which lives only in the process environment (a service manager's secret, never
``settings.yaml``, which usually sits next to the database).

``BOT_SECRET_KEY`` is either a Fernet key (urlsafe base64 of 32 bytes, as
``Fernet.generate_key()`` prints) or a passphrase of at least :data:`MIN_PASSPHRASE` characters,
stretched into a Fernet key with PBKDF2-HMAC-SHA256 (:data:`PBKDF2_ITERATIONS` rounds).

The passphrase salt is a fixed application constant, not a random salt stored with the data. A
salt exists to stop one precomputed table of guesses from serving against many victims; with a
fixed salt, someone could precompute guesses once for every installation of this bot. That is
acceptable for what this protects against, one copied database file: its attacker has to guess
the passphrase of that one installation, at :data:`PBKDF2_ITERATIONS` rounds per guess, which a
long passphrase nobody would guess (better, a random Fernet key, which has no passphrase to guess)
keeps out of reach. In return the key is a pure function of the variable: there is no salt to
store, lose or keep in step, and the same variable opens the keys of a restored backup or of
another instance.

Changing ``BOT_SECRET_KEY`` is not done in place: keys sealed with the old value can no longer be
read, and the store says so rather than guessing.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from bot.errors import ConfigError, StoreError

SECRET_KEY_ENV = "BOT_SECRET_KEY"  # noqa: S105 (the variable's name, not a secret)
PREFIX = "fernet:"
"""How an encrypted secret starts in the store; anything else is a plain secret."""
MIN_PASSPHRASE = 16
PBKDF2_ITERATIONS = 200_000
_SALT = b"feishu-gpt-bot/stored-api-keys/v1"  # fixed on purpose: see the module docstring
_FERNET_KEY = re.compile(r"[A-Za-z0-9_-]{43}=")

ENCRYPTED_NO_KEY = (
    "the stored API keys are encrypted: set BOT_SECRET_KEY to the value used when they were saved"
)
ENCRYPTED_OTHER_KEY = (
    "the stored API keys are encrypted with another BOT_SECRET_KEY than the one set now: "
    "set BOT_SECRET_KEY to the value used when they were saved"
)


def secret_key_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """``BOT_SECRET_KEY`` from the environment, or None when it is unset or blank."""
    env = os.environ if env is None else env
    value = env.get(SECRET_KEY_ENV, "").strip()
    return value or None


class KeyCipher:
    """Seals and opens API key secrets with one Fernet key; build it with :meth:`from_secret`."""

    def __init__(self, fernet_key: bytes) -> None:
        self._fernet = Fernet(fernet_key)

    @classmethod
    def from_secret(cls, value: str) -> KeyCipher:
        """The cipher for a ``BOT_SECRET_KEY`` value: a Fernet key, or a passphrase to stretch.

        Surrounding whitespace is ignored (a trailing newline from a secrets file). A value that
        is neither is a :class:`ConfigError` naming the variable; it never quotes the value.
        """
        value = value.strip()
        if _FERNET_KEY.fullmatch(value):
            return cls(value.encode("ascii"))
        if len(value) < MIN_PASSPHRASE:
            raise ConfigError(
                [
                    f"{SECRET_KEY_ENV}: is too short: use a passphrase of at least "
                    f"{MIN_PASSPHRASE} characters, or a Fernet key made with "
                    '`python -c "from cryptography.fernet import Fernet; '
                    'print(Fernet.generate_key().decode())"`'
                ]
            )
        return cls(derive_fernet_key(value))

    def seal(self, secret: str) -> str:
        """The stored form of ``secret``: ``fernet:<token>``."""
        return PREFIX + self._fernet.encrypt(secret.encode("utf-8")).decode("ascii")

    def open(self, stored: str) -> str:
        """The secret inside a ``fernet:`` value; :class:`StoreError` when this key cannot."""
        try:
            return self._fernet.decrypt(stored.removeprefix(PREFIX).encode("ascii")).decode()
        except (InvalidToken, UnicodeError):
            raise StoreError(ENCRYPTED_OTHER_KEY) from None

    def __repr__(self) -> str:
        return "KeyCipher(***)"


def derive_fernet_key(passphrase: str) -> bytes:
    """The Fernet key of a passphrase (PBKDF2-HMAC-SHA256, fixed application salt)."""
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=_SALT, iterations=PBKDF2_ITERATIONS)
    return base64.urlsafe_b64encode(kdf.derive(passphrase.encode("utf-8")))


def is_sealed(stored: str) -> bool:
    """Whether a stored secret is encrypted."""
    return stored.startswith(PREFIX)


def open_secret(stored: str, cipher: KeyCipher | None) -> str:
    """The secret of a stored value, plain or sealed; :class:`StoreError` when it cannot be read."""
    if not is_sealed(stored):
        return stored
    if cipher is None:
        raise StoreError(ENCRYPTED_NO_KEY)
    return cipher.open(stored)


def seal_secret(secret: str, cipher: KeyCipher | None) -> str:
    """The stored form of a secret: sealed with ``cipher``, or as it is without one."""
    return secret if cipher is None else cipher.seal(secret)
