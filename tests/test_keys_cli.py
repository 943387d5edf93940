"""``python -m bot keys …``: the key pool from the command line, run as a user runs it.

Every test runs the CLI in a subprocess against a store in its own temp directory, validating
keys against the fake OpenAI server, and checks that no full key ever reaches the output.
Slow suite (`make test-all`): each test starts Python processes.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.llm.keypool import key_id_of
from bot.logging import mask_key
from bot.store import InstanceLock
from tests.fakes.openai_server import FakeOpenAI, FakeOpenAIThread, insufficient_quota
from tests.helpers import BOT_COMMAND, bot_environment, run_bot, write_settings

pytestmark = pytest.mark.slow

CONFIG_KEY = "sk-cli-config-aaaaaaaaaaaaaaaa1111"
ENV_KEY = "sk-cli-env-bbbbbbbbbbbbbbbbbbbb2222"
NEW_KEY = "sk-cli-new-cccccccccccccccccccc3333"
BAD_KEY = "sk-cli-bad-dddddddddddddddddddd4444"
BROKE_KEY = "sk-cli-broke-eeeeeeeeeeeeeeeeee5555"
ALL_KEYS = (CONFIG_KEY, ENV_KEY, NEW_KEY, BAD_KEY, BROKE_KEY)
PASSPHRASE = "a long passphrase for the key store"


@pytest.fixture
def openai() -> Iterator[FakeOpenAIThread]:
    server = FakeOpenAI().run_in_thread()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def settings_file(tmp_path: Path, openai: FakeOpenAIThread) -> Path:
    return write_settings(
        tmp_path / "settings.yaml",
        {"llm": {"base_url": openai.base_url, "keys": [{"key": CONFIG_KEY, "owner": "alice"}]}},
    )


def keys(
    cwd: Path, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bot keys ARGS`` and check that no full key is in what it printed."""
    if stdin is None:
        done = run_bot("keys", *args, cwd=cwd, env=bot_environment(**env))
    else:
        done = subprocess.run(
            [*BOT_COMMAND, "keys", *args],
            cwd=cwd,
            env=bot_environment(**env),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    for secret in ALL_KEYS:
        assert secret not in done.stdout + done.stderr
    return done


def listed(cwd: Path, **env: str) -> dict[str, dict[str, Any]]:
    """The keys as ``keys list --json`` gives them, by key id."""
    done = keys(cwd, "list", "--json", **env)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    return {row["key_id"]: row for row in rows}


def test_list_shows_every_key_masked_with_its_owner_source_and_state(
    tmp_path: Path, settings_file: Path
) -> None:
    done = keys(tmp_path, "list", OPENAI_API_KEYS=ENV_KEY)

    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == [
        "KEY",
        "ID",
        "KEY",
        "OWNER",
        "SOURCE",
        "STATE",
        "REASON",
        "REQUESTS",
        "FAILURES",
        "LAST",
        "USED",
    ]
    assert rows[0].split() == [
        key_id_of(CONFIG_KEY),
        mask_key(CONFIG_KEY),
        "alice",
        "config",
        "active",
        "-",
        "0",
        "0",
        "never",
    ]
    assert rows[1].split()[:5] == [
        key_id_of(ENV_KEY),
        mask_key(ENV_KEY),
        "env",
        "env",
        "active",
    ]


def test_list_json_gives_one_object_per_key_and_line(tmp_path: Path, settings_file: Path) -> None:
    rows = listed(tmp_path, OPENAI_API_KEYS=ENV_KEY)

    assert list(rows) == [key_id_of(CONFIG_KEY), key_id_of(ENV_KEY)]
    assert rows[key_id_of(CONFIG_KEY)] == {
        "key_id": key_id_of(CONFIG_KEY),
        "masked": mask_key(CONFIG_KEY),
        "owner": "alice",
        "source": "config",
        "state": "active",
        "reason": None,
        "disabled_by": None,
        "until": None,
        "requests": 0,
        "failures": 0,
        "last_used_at": None,
    }


def test_list_without_keys_says_how_to_add_one(tmp_path: Path) -> None:
    write_settings(tmp_path / "settings.yaml", {"keys": {"accept_donations": True}})

    done = keys(tmp_path, "list")

    assert done.returncode == 0, done.stderr
    assert "No API keys yet" in done.stdout
    assert "python -m bot keys add KEY" in done.stdout


def test_add_validates_the_key_and_stores_it_as_donated_by_its_owner(
    tmp_path: Path, settings_file: Path, openai: FakeOpenAIThread
) -> None:
    done = keys(tmp_path, "add", NEW_KEY, "--owner", "bob")

    assert done.returncode == 0, done.stderr
    assert f"Added {key_id_of(NEW_KEY)} {mask_key(NEW_KEY)} (owner bob, valid)." in done.stdout
    assert "A running bot picks this change up at its next start." in done.stdout
    assert openai.fake.requests_for(NEW_KEY)  # it was validated with the provider
    row = listed(tmp_path)[key_id_of(NEW_KEY)]
    assert (row["owner"], row["source"], row["state"]) == ("bob", "donated", "active")


def test_add_reads_the_key_from_stdin_and_names_the_owner_cli_by_default(
    tmp_path: Path, settings_file: Path
) -> None:
    done = keys(tmp_path, "add", "-", stdin=f"{NEW_KEY}\n")

    assert done.returncode == 0, done.stderr
    assert listed(tmp_path)[key_id_of(NEW_KEY)]["owner"] == "cli"


def test_add_refuses_a_key_the_provider_rejects(
    tmp_path: Path, settings_file: Path, openai: FakeOpenAIThread
) -> None:
    openai.fake.invalidate(BAD_KEY)

    done = keys(tmp_path, "add", BAD_KEY)

    assert done.returncode == 1
    assert f"error: {mask_key(BAD_KEY)} was not added: invalid" in done.stderr
    assert key_id_of(BAD_KEY) not in listed(tmp_path)


def test_add_refuses_a_key_without_quota(
    tmp_path: Path, settings_file: Path, openai: FakeOpenAIThread
) -> None:
    openai.fake.script(
        BROKE_KEY, persistent=insufficient_quota(), models_persistent=insufficient_quota()
    )

    done = keys(tmp_path, "add", BROKE_KEY)

    assert done.returncode == 1
    assert "was not added: no_quota" in done.stderr
    assert key_id_of(BROKE_KEY) not in listed(tmp_path)


def test_add_when_the_endpoint_is_unreachable_suggests_no_check(tmp_path: Path) -> None:
    write_settings(tmp_path / "settings.yaml", {"llm": {"base_url": "http://127.0.0.1:9/v1"}})

    refused = keys(tmp_path, "add", NEW_KEY)
    added = keys(tmp_path, "add", NEW_KEY, "--no-check")

    assert refused.returncode == 1
    assert "unreachable" in refused.stderr
    assert "--no-check" in refused.stderr
    assert added.returncode == 0, added.stderr
    assert "(owner cli, not checked)" in added.stdout
    assert listed(tmp_path)[key_id_of(NEW_KEY)]["state"] == "active"


def test_adding_a_key_already_in_the_pool_changes_nothing(
    tmp_path: Path, settings_file: Path, openai: FakeOpenAIThread
) -> None:
    done = keys(tmp_path, "add", CONFIG_KEY, "--owner", "mallory")

    assert done.returncode == 0, done.stderr
    assert "is already in the pool (owner alice, config, active): nothing changed" in done.stdout
    assert not openai.fake.requests_for(CONFIG_KEY)
    assert listed(tmp_path)[key_id_of(CONFIG_KEY)]["owner"] == "alice"


def test_a_donated_key_is_disabled_by_hand_with_a_reason_and_enabled_again(
    tmp_path: Path, settings_file: Path
) -> None:
    keys(tmp_path, "add", NEW_KEY, "--no-check")
    key_id = key_id_of(NEW_KEY)

    disabled = keys(tmp_path, "disable", key_id, "--reason", "shared too widely")
    after_disable = listed(tmp_path)[key_id]
    table = keys(tmp_path, "list").stdout
    enabled = keys(tmp_path, "enable", key_id)
    after_enable = listed(tmp_path)[key_id]

    assert disabled.returncode == 0, disabled.stderr
    assert f"Disabled {key_id} {mask_key(NEW_KEY)}: shared too widely." in disabled.stdout
    assert "next start" in disabled.stdout
    assert after_disable["state"] == "disabled"
    assert after_disable["reason"] == "shared too widely"
    assert after_disable["disabled_by"] == "manual"
    assert "shared too widely (manual)" in table
    assert enabled.returncode == 0, enabled.stderr
    assert f"Enabled {key_id} {mask_key(NEW_KEY)}." in enabled.stdout
    assert (after_enable["state"], after_enable["reason"]) == ("active", None)


def test_disable_without_a_reason_says_it_was_by_hand(tmp_path: Path, settings_file: Path) -> None:
    keys(tmp_path, "add", NEW_KEY, "--no-check")

    keys(tmp_path, "disable", key_id_of(NEW_KEY))

    assert listed(tmp_path)[key_id_of(NEW_KEY)]["reason"] == "disabled by hand"


def test_a_key_from_settings_is_disabled_in_settings_not_here(
    tmp_path: Path, settings_file: Path
) -> None:
    done = keys(tmp_path, "disable", key_id_of(CONFIG_KEY))

    assert done.returncode == 1
    assert "is configured in settings.yaml: set `enabled: false` on it under llm.keys" in (
        done.stderr
    )
    assert listed(tmp_path)[key_id_of(CONFIG_KEY)]["state"] == "active"


def test_a_key_disabled_in_settings_is_enabled_there_not_here(tmp_path: Path) -> None:
    write_settings(
        tmp_path / "settings.yaml", {"llm": {"keys": [{"key": CONFIG_KEY, "enabled": False}]}}
    )

    done = keys(tmp_path, "enable", key_id_of(CONFIG_KEY))

    assert done.returncode == 1
    assert "set `enabled: true` on it under llm.keys" in done.stderr


def test_keys_from_settings_or_the_environment_are_removed_there_not_here(
    tmp_path: Path, settings_file: Path
) -> None:
    from_settings = keys(tmp_path, "remove", key_id_of(CONFIG_KEY), OPENAI_API_KEYS=ENV_KEY)
    from_env = keys(tmp_path, "remove", key_id_of(ENV_KEY), OPENAI_API_KEYS=ENV_KEY)

    assert from_settings.returncode == 1
    assert "remove it from settings.yaml (llm.keys) instead" in from_settings.stderr
    assert from_env.returncode == 1
    assert "comes from the OPENAI_API_KEYS environment variable" in from_env.stderr
    assert "remove it from OPENAI_API_KEYS instead" in from_env.stderr
    assert len(listed(tmp_path, OPENAI_API_KEYS=ENV_KEY)) == 2


def test_remove_deletes_a_donated_key_for_good(tmp_path: Path, settings_file: Path) -> None:
    keys(tmp_path, "add", NEW_KEY, "--no-check")

    done = keys(tmp_path, "remove", key_id_of(NEW_KEY))

    assert done.returncode == 0, done.stderr
    assert f"Removed {key_id_of(NEW_KEY)} {mask_key(NEW_KEY)}." in done.stdout
    assert key_id_of(NEW_KEY) not in listed(tmp_path)


def test_a_key_taken_out_of_the_environment_can_then_be_removed(
    tmp_path: Path, settings_file: Path
) -> None:
    keys(tmp_path, "list", OPENAI_API_KEYS=ENV_KEY)  # the bot saw it once

    left_over = listed(tmp_path)[key_id_of(ENV_KEY)]
    done = keys(tmp_path, "remove", key_id_of(ENV_KEY))

    assert left_over["state"] == "disabled"
    assert done.returncode == 0, done.stderr
    assert key_id_of(ENV_KEY) not in listed(tmp_path)


def test_an_unknown_key_id_fails_and_says_where_the_ids_are(
    tmp_path: Path, settings_file: Path
) -> None:
    done = keys(tmp_path, "enable", "0123456789ab")

    assert done.returncode == 1
    assert "no key with id 0123456789ab in the pool: `python -m bot keys list` shows the ids" in (
        done.stderr
    )


@pytest.mark.parametrize("command", ["disable", "enable", "remove", "check"])
def test_a_key_pasted_instead_of_its_id_is_a_usage_error_that_never_echoes_it(
    tmp_path: Path, settings_file: Path, command: str
) -> None:
    done = keys(tmp_path, command, CONFIG_KEY)  # keys() asserts it is not printed

    assert done.returncode == 2
    assert "KEY_ID must be a key id" in done.stderr
    assert mask_key(CONFIG_KEY) not in done.stderr


def test_check_gives_each_key_a_verdict_and_fails_when_one_is_refused(
    tmp_path: Path, settings_file: Path, openai: FakeOpenAIThread
) -> None:
    openai.fake.invalidate(ENV_KEY)

    done = keys(tmp_path, "check", OPENAI_API_KEYS=ENV_KEY)

    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].split()[:6] == ["KEY", "ID", "KEY", "OWNER", "STATE", "VERDICT"]
    assert lines[1].split()[:5] == [
        key_id_of(CONFIG_KEY),
        mask_key(CONFIG_KEY),
        "alice",
        "active",
        "valid",
    ]
    assert lines[2].split()[:5] == [
        key_id_of(ENV_KEY),
        mask_key(ENV_KEY),
        "env",
        "active",
        "invalid",
    ]
    assert "2 checked: 1 invalid, 1 valid." in done.stdout
    assert listed(tmp_path, OPENAI_API_KEYS=ENV_KEY)[key_id_of(ENV_KEY)]["state"] == "active"


def test_check_of_one_key_passes_when_it_is_valid(
    tmp_path: Path, settings_file: Path, openai: FakeOpenAIThread
) -> None:
    openai.fake.invalidate(ENV_KEY)

    done = keys(tmp_path, "check", key_id_of(CONFIG_KEY), OPENAI_API_KEYS=ENV_KEY)

    assert done.returncode == 0, done.stderr
    assert "1 checked: 1 valid." in done.stdout
    assert not openai.fake.requests_for(ENV_KEY)


def test_check_of_an_unreachable_endpoint_judges_no_key_and_says_what_to_look_at(
    tmp_path: Path,
) -> None:
    write_settings(
        tmp_path / "settings.yaml",
        {"llm": {"base_url": "http://127.0.0.1:9/v1", "keys": [{"key": CONFIG_KEY}]}},
    )

    done = keys(tmp_path, "check")

    assert done.returncode == 0  # only a key found unusable fails the check
    assert "1 checked: 1 unreachable." in done.stdout
    assert "Some keys could not be judged: check llm.base_url (http://127.0.0.1:9/v1)" in (
        done.stdout
    )


def test_check_with_no_keys_fails(tmp_path: Path) -> None:
    write_settings(tmp_path / "settings.yaml", {})

    done = keys(tmp_path, "check")

    assert done.returncode == 1
    assert "no API keys to check" in done.stderr


def test_a_change_while_a_bot_runs_on_the_store_names_it_and_says_to_restart(
    tmp_path: Path, settings_file: Path
) -> None:
    with InstanceLock(tmp_path / "data" / "bot.db.lock"):
        added = keys(tmp_path, "add", NEW_KEY, "--no-check")
        disabled = keys(tmp_path, "disable", key_id_of(NEW_KEY))

    assert added.returncode == 0, added.stderr
    assert "A running bot (pid " in added.stdout
    assert "Restart it to use the key now." in added.stdout
    assert disabled.returncode == 0, disabled.stderr
    assert "A running bot (pid " in disabled.stdout
    assert "Restart it now: until then it works from its own copy of the keys" in (disabled.stdout)


def test_with_a_secret_key_the_stored_keys_are_encrypted_and_need_it_to_be_read(
    tmp_path: Path, settings_file: Path
) -> None:
    added = keys(tmp_path, "add", NEW_KEY, "--no-check", BOT_SECRET_KEY=PASSPHRASE)
    without = keys(tmp_path, "list")
    wrong = keys(tmp_path, "list", BOT_SECRET_KEY="another passphrase, not the one")
    right = listed(tmp_path, BOT_SECRET_KEY=PASSPHRASE)

    assert added.returncode == 0, added.stderr
    database = b"".join(path.read_bytes() for path in (tmp_path / "data").iterdir())
    assert NEW_KEY.encode() not in database
    assert CONFIG_KEY.encode() not in database
    assert without.returncode == 1
    assert (
        "error: the stored API keys are encrypted: set BOT_SECRET_KEY to the value used when "
        "they were saved" in without.stderr
    )
    assert wrong.returncode == 1
    assert "set BOT_SECRET_KEY to the value used when they were saved" in wrong.stderr
    assert set(right) == {key_id_of(CONFIG_KEY), key_id_of(NEW_KEY)}


def test_keys_stored_plain_are_encrypted_once_a_secret_key_is_set(
    tmp_path: Path, settings_file: Path
) -> None:
    keys(tmp_path, "add", NEW_KEY, "--no-check")

    done = keys(tmp_path, "list", BOT_SECRET_KEY=PASSPHRASE)

    assert done.returncode == 0, done.stderr
    with sqlite3.connect(tmp_path / "data" / "bot.db") as connection:
        stored = [row[0] for row in connection.execute("SELECT secret FROM api_keys")]
    connection.close()
    assert len(stored) == 2
    assert all(value.startswith("fernet:") for value in stored)


def test_a_secret_key_too_short_is_a_configuration_error(
    tmp_path: Path, settings_file: Path
) -> None:
    done = keys(tmp_path, "list", BOT_SECRET_KEY="hunter2")

    assert done.returncode == 2
    assert done.stderr.startswith("error: BOT_SECRET_KEY: is too short")
    assert "hunter2" not in done.stderr


def test_a_configuration_error_exits_2_naming_the_field(tmp_path: Path) -> None:
    write_settings(tmp_path / "settings.yaml", {"store": {"url": "mysql://db/bot"}})

    done = keys(tmp_path, "list")

    assert done.returncode == 2
    assert done.stderr.startswith("error: store.url:")


def test_common_options_work_before_and_after_the_subcommand(
    tmp_path: Path, settings_file: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    settings_file.rename(other / "custom.yaml")

    before = keys(tmp_path, "--config", "other/custom.yaml", "list", "--json")
    after = keys(tmp_path, "list", "--json", "--config", "other/custom.yaml")

    assert before.returncode == 0, before.stderr
    assert after.returncode == 0, after.stderr
    assert key_id_of(CONFIG_KEY) in before.stdout
    assert before.stdout == after.stdout


def test_help_describes_every_subcommand_and_when_changes_apply(tmp_path: Path) -> None:
    overview = keys(tmp_path, "--help")
    add_help = keys(tmp_path, "add", "--help")
    missing = keys(tmp_path)

    assert overview.returncode == 0
    for command in ("list", "add KEY", "disable KEY_ID", "enable KEY_ID", "remove KEY_ID"):
        assert command in overview.stdout
    assert "check [KEY_ID]" in overview.stdout
    assert "next start" in overview.stdout
    assert "BOT_SECRET_KEY" in overview.stdout
    assert add_help.returncode == 0
    assert "--no-check" in add_help.stdout
    assert "standard input" in add_help.stdout
    assert "--owner NAME" in add_help.stdout
    assert missing.returncode == 2
