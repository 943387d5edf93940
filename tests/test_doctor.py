"""`doctor`: every check against the fakes, and what a newcomer reads for each problem.

The checks run in-process (:func:`bot.doctor.runner.run_doctor`) against the fake Feishu and the
fake OpenAI over real sockets; the output is what ``python -m bot doctor`` prints. Every test
also asserts that no secret (the app secret, any key) appears in the output.
"""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bot.config import Settings, parse_settings
from bot.doctor.console import LARK_DOMAIN
from bot.doctor.feishu import PROBE_SECRET
from bot.doctor.render import Printer, render_result, summary
from bot.doctor.report import Report, Result
from bot.doctor.runner import DoctorOptions, run_doctor
from bot.doctor.scopes import REQUIRED_SCOPES, RESOURCE_SCOPE, SPEECH_SCOPE, USER_ID_SCOPE
from bot.llm.keypool import key_id_of
from bot.logging import Redactor, mask_key
from bot.store import InstanceLock, StoredKey, create_store
from tests.fakes.feishu_server import DEFAULT_SCOPES, FakeFeishu
from tests.fakes.openai_server import FakeOpenAI

APP_SECRET = "app-secret-5f3c9e2b7d41a8"
KEY = "sk-doctor-good-key-000000000000000000000001"
DEAD_KEY = "sk-doctor-dead-key-000000000000000000000002"
DONATED_KEY = "sk-doctor-donated-key-0000000000000000000003"
SECRET_KEY = "a passphrase of more than sixteen characters"


@dataclass
class Outcome:
    """What doctor found and printed."""

    report: Report
    text: str

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()

    def line(self, start: str) -> str:
        """The one line starting with ``start`` (e.g. ``"✗ bot:"``)."""
        found = [line for line in self.lines if line.startswith(start)]
        assert len(found) == 1, f"{start!r} in:\n{self.text}"
        return found[0]

    def fix_after(self, start: str) -> str:
        """The fix printed under the line starting with ``start``."""
        lines = self.lines
        index = lines.index(self.line(start))
        assert lines[index + 1].startswith("    fix: "), self.text
        return lines[index + 1].removeprefix("    fix: ")

    def statuses(self) -> dict[str, str]:
        return {result.name: result.status for result in self.report.results}


@pytest.fixture
async def feishu() -> AsyncIterator[FakeFeishu]:
    async with FakeFeishu(app_id="cli_doctor_0000001", app_secret=APP_SECRET) as fake:
        yield fake


@pytest.fixture
async def llm() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake


def settings_for(feishu: FakeFeishu, llm: FakeOpenAI, /, **sections: dict[str, Any]) -> Settings:
    raw: dict[str, Any] = {
        "feishu": {"app_id": feishu.app_id, "app_secret": APP_SECRET, "domain": feishu.domain},
        "llm": {"base_url": llm.base_url, "model": "gpt-4o-mini", "keys": [{"key": KEY}]},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return parse_settings(raw)


async def doctor(settings: Settings, **options: Any) -> Outcome:
    options.setdefault("timeout_s", 5.0)
    redactor = Redactor(settings.secrets())
    out = io.StringIO()
    printer = Printer(out, redactor)
    report = await run_doctor(
        settings, DoctorOptions(**options), on_result=printer.result, redactor=redactor
    )
    printer.summary(report)
    text = out.getvalue()
    for secret in (APP_SECRET, KEY, DEAD_KEY, DONATED_KEY, SECRET_KEY):
        assert secret not in text
        assert secret[-8:] not in text
    return Outcome(report, text)


# ---- all green -------------------------------------------------------------------------------


async def test_a_well_set_up_app_passes_every_check_in_order_and_exits_0(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    outcome = await doctor(settings_for(feishu, llm))

    assert outcome.report.exit_code == 0
    names = [result.name for result in outcome.report.results]
    assert names == [
        "config",
        "feishu app",
        "bot",
        "scopes",
        "long connection",
        f"llm key {mask_key(KEY)} (id {key_id_of(KEY)})",
        "models",
        "chat completion",
        "store",
        "events",
        "subscription mode",
        "release",
        "try it",
    ]
    assert {r.status for r in outcome.report.results[:9]} == {"ok"}
    assert {r.status for r in outcome.report.results[9:]} == {"manual"}
    assert outcome.line("✓ bot:") == "✓ bot: GPT Bot is enabled (its open_id is ou_bot_open_id)"
    assert "first token after" in outcome.line("✓ chat completion:")
    assert outcome.lines[-1].startswith("doctor: all 9 checks passed.")
    # The long connection was opened and closed again at once.
    assert [c.endpoint for c in feishu.calls_to()] == [
        "tenant_token",
        "bot_info",
        "application_scopes",
        "ws_endpoint",
        "ws_connect",
    ]
    await feishu.wait_until(lambda: feishu.connections and not feishu.connections[0].open)
    completion = llm.requests_for(KEY, path="/v1/chat/completions")[0]
    assert completion.stream
    assert completion.body["max_tokens"] == 5


def test_the_fake_grants_exactly_the_scopes_of_the_doctor_table() -> None:
    table = (*REQUIRED_SCOPES, USER_ID_SCOPE, RESOURCE_SCOPE, SPEECH_SCOPE)
    assert set(DEFAULT_SCOPES) == {s.name for s in table}


# ---- Feishu credentials and platform ---------------------------------------------------------


async def test_a_wrong_secret_says_where_to_copy_it_and_skips_the_later_feishu_checks(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    feishu.set_credentials(feishu.app_id, "the-secret-feishu-knows")

    outcome = await doctor(settings_for(feishu, llm))

    assert outcome.report.exit_code == 1
    assert outcome.line("✗ feishu app:") == (
        "✗ feishu app: Feishu rejected the App Secret of cli_doctor_0000001 "
        "(10014: app secret invalid)"
    )
    assert outcome.fix_after("✗ feishu app:") == (
        "copy the App Secret again from https://open.feishu.cn/app → your app → "
        "Credentials & Basic Info (凭证与基础信息) into FEISHU_APP_SECRET (or "
        "feishu.app_secret); after a reset there only the new one works"
    )
    for name in ("bot", "scopes", "long connection"):
        assert outcome.line(f"! {name}:").endswith(
            "not checked: no tenant token (fix `feishu app` above first)"
        )
    assert not feishu.calls_to("ws_endpoint")
    assert outcome.statuses()["chat completion"] == "ok"  # the LLM is checked all the same


async def test_an_app_id_of_the_other_platform_names_the_domain_to_set(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    feishu.unknown_app_error = (10014, "app id not exists")
    async with FakeFeishu(app_id="cli_lark_app_00001", app_secret=APP_SECRET) as lark:
        settings = settings_for(feishu, llm, feishu={"app_id": lark.app_id})

        outcome = await doctor(settings, counterparts={feishu.domain: lark.domain})

    assert outcome.line("✗ feishu app:") == (
        f"✗ feishu app: cli_lark_app_00001 is not an app of {feishu.domain} "
        f"(10014: app id not exists) but of {lark.domain}"
    )
    assert outcome.fix_after("✗ feishu app:") == (
        f"set `feishu.domain: {lark.domain}` in settings.yaml"
    )
    # The other platform was asked with a dummy secret, never the real one.
    (asked,) = lark.calls_to("tenant_token")
    assert asked.json == {"app_id": "cli_lark_app_00001", "app_secret": PROBE_SECRET}


@pytest.mark.parametrize(
    "answer", [(10014, "app id not exists"), (10003, "invalid param")], ids=["unknown", "malformed"]
)
async def test_an_app_id_unknown_here_suggests_the_other_platform_explicitly(
    feishu: FakeFeishu, llm: FakeOpenAI, answer: tuple[int, str]
) -> None:
    feishu.unknown_app_error = answer
    settings = settings_for(feishu, llm, feishu={"app_id": "cli_nobody_knows_it"})

    outcome = await doctor(settings)

    code, msg = answer
    assert outcome.line("✗ feishu app:") == (
        f"✗ feishu app: {feishu.domain} does not know the App ID cli_nobody_knows_it "
        f"({code}: {msg})"
    )
    assert outcome.fix_after("✗ feishu app:") == (
        "copy the App ID (cli_…) again from https://open.feishu.cn/app → your app → "
        "Credentials & Basic Info (凭证与基础信息); if the app was made on the other platform, "
        f"set `feishu.domain: {LARK_DOMAIN}` in settings.yaml"
    )


async def test_an_unreachable_domain_names_the_network_and_the_domain(llm: FakeOpenAI) -> None:
    async with FakeFeishu() as gone:
        domain = gone.domain
    settings = parse_settings(
        {
            "feishu": {"app_id": "cli_x", "app_secret": APP_SECRET, "domain": domain},
            "llm": {"base_url": llm.base_url, "keys": [{"key": KEY}]},
        }
    )

    outcome = await doctor(settings)

    assert outcome.line("✗ feishu app:").startswith(f"✗ feishu app: cannot reach {domain}: ")
    assert outcome.fix_after("✗ feishu app:") == (
        f"check the network and any proxy (HTTPS_PROXY), and feishu.domain ({domain}): "
        "https://open.feishu.cn for Feishu, https://open.larksuite.com for Lark"
    )


async def test_network_requests_give_up_after_the_short_timeout(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    feishu.delay("tenant_token", 3)
    started = time.monotonic()

    outcome = await doctor(settings_for(feishu, llm), timeout_s=0.3)

    assert time.monotonic() - started < 2.5
    assert outcome.line("✗ feishu app:") == (
        f"✗ feishu app: cannot reach {feishu.domain}: no answer within 0.3 s"
    )


# ---- the bot feature and scopes --------------------------------------------------------------


async def test_an_app_without_the_bot_feature_says_where_to_add_it(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    feishu.bot_enabled = False

    outcome = await doctor(settings_for(feishu, llm))

    assert outcome.report.exit_code == 1
    assert outcome.line("✗ bot:") == (
        "✗ bot: the app has no bot feature (11205: app do not have bot)"
    )
    assert outcome.fix_after("✗ bot:") == (
        "https://open.feishu.cn/app → your app → Add features (添加应用能力) → Bot (机器人), "
        "then Version Management & Release (版本管理与发布) → Create a version (创建版本) → "
        "publish it, and have the tenant admin approve it"
    )


async def test_a_bot_not_enabled_in_the_tenant_asks_for_a_published_version(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    feishu.bot_activate_status = 0

    outcome = await doctor(settings_for(feishu, llm))

    assert outcome.line("✗ bot:") == (
        "✗ bot: GPT Bot is not installed in the tenant yet (activate_status 0)"
    )
    assert "Create a version (创建版本)" in outcome.fix_after("✗ bot:")


async def test_each_missing_scope_is_named_with_what_breaks_without_it(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    feishu.set_scopes(
        ["im:message", "im:message:send_as_bot", "im:message.group_at_msg:readonly"],
        not_granted=["cardkit:card:write"],
    )

    outcome = await doctor(settings_for(feishu, llm))

    assert outcome.report.exit_code == 1
    assert outcome.line("✗ scope im:message.p2p_msg:readonly:") == (
        "✗ scope im:message.p2p_msg:readonly: not added: the bot receives none of the messages "
        "sent to it privately"
    )
    assert outcome.fix_after("✗ scope im:message.p2p_msg:readonly:") == (
        "https://open.feishu.cn/app → your app → Permissions & Scopes (权限管理) → add "
        "im:message.p2p_msg:readonly, then Version Management & Release (版本管理与发布) → "
        "Create a version (创建版本) → publish it, and have the tenant admin approve it"
    )
    assert outcome.line("✗ scope cardkit:card:write:") == (
        "✗ scope cardkit:card:write: requested but not granted yet: answers cannot stream into "
        "a card: they arrive all at once as a plain card or text"
    )
    assert outcome.fix_after("✗ scope cardkit:card:write:").startswith(
        "publish a version that includes it: "
    )
    assert [line for line in outcome.lines if line.startswith("✗ scope")] == [
        outcome.line("✗ scope im:message.p2p_msg:readonly:"),
        outcome.line("✗ scope cardkit:card:write:"),
    ]
    # Not needed by these settings: a note, not a failure.
    assert outcome.line("! scopes:") == (
        "! scopes: contact:user.employee_id:readonly is not granted; not needed while "
        "access.allow and access.admins name only open_ids (ou_…) and chat ids (oc_…)"
    )


async def test_missing_media_scopes_are_notes_naming_what_degrades(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    feishu.set_scopes([*(s.name for s in REQUIRED_SCOPES), USER_ID_SCOPE.name])

    outcome = await doctor(settings_for(feishu, llm))

    assert outcome.report.exit_code == 0  # text answers work without them
    assert outcome.line("! scope im:resource:") == (
        "! scope im:resource: not added: the images, files and voice messages users send cannot "
        "be downloaded, and drawings and formulas cannot be shown as images"
    )
    assert outcome.line("! scope speech_to_text:speech:").startswith(
        "! scope speech_to_text:speech: not added: voice messages cannot be transcribed"
    )


async def test_the_speech_scope_is_not_needed_when_the_endpoint_transcribes(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    feishu.set_scopes([*(s.name for s in REQUIRED_SCOPES), USER_ID_SCOPE.name, "im:resource"])

    outcome = await doctor(settings_for(feishu, llm, llm={"transcription_model": "whisper-1"}))

    assert not [line for line in outcome.lines if "speech_to_text" in line]


async def test_the_user_id_scope_is_a_note_until_the_access_lists_name_user_ids(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    feishu.set_scopes(s.name for s in REQUIRED_SCOPES)

    by_open_ids = await doctor(
        settings_for(feishu, llm, access={"allow": ["ou_a", "oc_group"], "admins": ["ou_b"]})
    )
    by_user_ids = await doctor(
        settings_for(feishu, llm, access={"allow": ["ou_a"], "admins": ["e33ggbyz"]})
    )

    assert by_open_ids.report.exit_code == 0
    assert by_open_ids.line("! scopes:").startswith(
        "! scopes: contact:user.employee_id:readonly is not granted; not needed"
    )
    assert by_user_ids.report.exit_code == 1
    assert by_user_ids.line("✗ scope contact:user.employee_id:readonly:") == (
        "✗ scope contact:user.employee_id:readonly: not added: events carry no user_id, so "
        "entries of access.allow / access.admins that are user_ids never match anyone "
        "(access lists name user_ids: e33ggbyz)"
    )


# ---- the long connection ---------------------------------------------------------------------


async def test_a_websocket_that_cannot_be_opened_points_at_the_firewall(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    async with FakeFeishu() as gone:
        closed = f"ws://127.0.0.1:{gone.port}/ws"
    feishu.ws_url = closed

    outcome = await doctor(settings_for(feishu, llm))

    host = closed.removeprefix("ws://").removesuffix("/ws")
    assert outcome.line("✗ long connection:").startswith(
        f"✗ long connection: cannot open the WebSocket to {host}: "
    )
    assert outcome.fix_after("✗ long connection:") == (
        f"allow outgoing WebSocket connections (wss://, port 443) to {host}: a firewall or "
        "proxy is in the way"
    )
    assert "ticket" not in outcome.text


async def test_a_refused_handshake_asks_for_the_persistent_connection_mode(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    feishu.fail("ws_connect", code=403, msg="forbidden", http_status=403)

    outcome = await doctor(settings_for(feishu, llm))

    assert outcome.line("✗ long connection:") == (
        "✗ long connection: Feishu refused the WebSocket (403: forbidden)"
    )
    assert outcome.fix_after("✗ long connection:") == (
        "set https://open.feishu.cn/app → your app → Events & Callbacks (事件与回调) → "
        'subscription mode to "Receive events through persistent connection" (使用长连接接收事件), '
        "save, and Version Management & Release (版本管理与发布) → Create a version (创建版本) → "
        "publish it, and have the tenant admin approve it"
    )


async def test_a_refused_endpoint_discovery_is_named_with_its_code(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    feishu.fail("ws_endpoint", 10001, "app has no long connection", http_status=200)

    outcome = await doctor(settings_for(feishu, llm))

    assert outcome.line("✗ long connection:") == (
        "✗ long connection: Feishu refused the long connection (10001: app has no long connection)"
    )
    assert not feishu.calls_to("ws_connect")


async def test_the_connection_limit_says_other_instances_are_connected(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    feishu.fail(
        "ws_connect",
        code=514,
        msg="exceed connection limit",
        http_status=514,
        headers={"handshake-autherrcode": "1000040350"},
    )

    outcome = await doctor(settings_for(feishu, llm))

    assert outcome.line("✗ long connection:") == (
        "✗ long connection: Feishu refused the WebSocket (514: exceed connection limit, "
        "1000040350): the app already has as many long connections as Feishu allows, so other "
        "instances of this bot (or another program with this App ID) are connected"
    )
    assert outcome.fix_after("✗ long connection:") == (
        "stop the other instances (another `make run`, a server, a container), then run "
        "doctor again"
    )


@pytest.fixture
def running_bot(isolated: Path) -> Iterator[str]:
    """This machine's bot: the store's instance lock, held as `make run` holds it."""
    lock = InstanceLock(isolated / "data" / "bot.db.lock")
    with lock:
        yield lock.path.read_text().strip()


async def test_a_bot_running_here_is_named_when_the_connection_limit_is_hit(
    feishu: FakeFeishu, llm: FakeOpenAI, running_bot: str
) -> None:
    feishu.fail(
        "ws_connect",
        code=514,
        msg="exceed connection limit",
        http_status=514,
        headers={"handshake-autherrcode": "1000040350"},
    )

    outcome = await doctor(settings_for(feishu, llm))

    assert outcome.line("✗ long connection:").endswith(
        f"are connected; one is the bot running on this machine ({running_bot})"
    )


# ---- the store -------------------------------------------------------------------------------


async def test_a_store_locked_by_a_running_bot_is_a_note_that_does_not_fail_doctor(
    feishu: FakeFeishu, llm: FakeOpenAI, running_bot: str, isolated: Path
) -> None:
    outcome = await doctor(settings_for(feishu, llm))

    assert outcome.report.exit_code == 0
    assert running_bot.startswith("pid ")
    store = isolated / "data" / "bot.db"
    assert outcome.line("! store lock:") == (
        f"! store lock: {store} is in use by a running bot ({running_bot}); fine for doctor, "
        "but a second `make run` on this store refuses to start"
    )
    assert outcome.fix_after("! store lock:") == (
        "stop that bot (kill PID) before `make run` here, or give this one its own store.url"
    )
    assert outcome.line("✓ long connection:").endswith(
        f"opened; a bot is running on this machine ({running_bot})"
    )
    assert outcome.lines[-1].startswith("doctor: all 9 checks passed, 1 note.")


async def test_a_store_that_cannot_be_opened_fails_with_its_path(
    feishu: FakeFeishu, llm: FakeOpenAI, isolated: Path
) -> None:
    (isolated / "data").write_text("a file where the directory should be")

    outcome = await doctor(settings_for(feishu, llm))

    assert outcome.line("✗ store:").startswith(f"✗ store: cannot open {isolated}/data/bot.db: ")
    assert outcome.line("! donated keys:") == (
        "! donated keys: not checked: the store did not open (see below)"
    )


# ---- the LLM ---------------------------------------------------------------------------------


async def test_a_dead_key_is_named_masked_with_its_id_and_the_working_key_still_answers(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    llm.invalidate(DEAD_KEY)
    settings = settings_for(feishu, llm, llm={"keys": [{"key": DEAD_KEY}, {"key": KEY}]})

    outcome = await doctor(settings)

    assert outcome.report.exit_code == 1
    dead = f"✗ llm key {mask_key(DEAD_KEY)} (id {key_id_of(DEAD_KEY)}):"
    assert outcome.line(dead) == (
        f"{dead} llm.keys, owner config: refused by {llm.base_url} (401 invalid_api_key)"
    )
    assert outcome.fix_after(dead) == f"replace it in llm.keys with a key {llm.base_url} accepts"
    assert outcome.statuses()["chat completion"] == "ok"
    assert llm.requests_for(KEY, path="/v1/chat/completions")


async def test_donated_keys_in_the_store_are_checked_too(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    settings = settings_for(feishu, llm)
    await _donate(settings, DONATED_KEY, secret_key=None)
    llm.invalidate(DONATED_KEY)

    outcome = await doctor(settings)

    donated = f"✗ llm key {mask_key(DONATED_KEY)} (id {key_id_of(DONATED_KEY)}):"
    assert outcome.line(donated).startswith(f"{donated} donated by ou_donor: refused by ")
    assert outcome.fix_after(donated) == (
        "the bot takes it out of service by itself; to drop it: "
        f"`python -m bot keys remove {key_id_of(DONATED_KEY)}`"
    )


async def test_encrypted_stored_keys_without_bot_secret_key_say_so(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    settings = settings_for(feishu, llm)
    await _donate(settings, DONATED_KEY, secret_key=SECRET_KEY)

    locked_out = await doctor(settings)
    with_key = await doctor(settings, secret_key=SECRET_KEY)

    assert locked_out.line("✗ donated keys:") == (
        "✗ donated keys: cannot read them: the stored API keys are encrypted: set "
        "BOT_SECRET_KEY to the value used when they were saved"
    )
    assert locked_out.fix_after("✗ donated keys:") == (
        "run doctor with the BOT_SECRET_KEY the bot runs with (it cannot be recovered: keys "
        "stored with a lost one must be shared again)"
    )
    assert with_key.line(f"✓ llm key {mask_key(DONATED_KEY)}").endswith(
        "donated by ou_donor: GET /models listed 3 models"
    )


async def _donate(settings: Settings, secret: str, *, secret_key: str | None) -> None:
    store = create_store(settings.store, secret_key=secret_key)
    await store.open()
    try:
        await store.save_key(
            StoredKey(
                key_id=key_id_of(secret),
                secret=secret,
                masked=mask_key(secret),
                owner="ou_donor",
                source="donated",
            )
        )
    finally:
        await store.close()


async def test_no_key_at_all_fails_with_where_to_put_one(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    outcome = await doctor(settings_for(feishu, llm, llm={"keys": []}))

    assert outcome.line("✗ llm keys:") == (
        f"✗ llm keys: no API key to use with {llm.base_url}: the bot cannot answer anyone"
    )
    assert outcome.fix_after("✗ llm keys:") == (
        "set OPENAI_API_KEYS=sk-… (or add llm.keys in settings.yaml) or send the bot a key in "
        "a private chat"
    )


async def test_an_unknown_model_is_named_with_the_setting_and_the_models_on_offer(
    feishu: FakeFeishu, llm: FakeOpenAI
) -> None:
    settings = settings_for(
        feishu,
        llm,
        llm={"model": "gpt-9-turbo", "models": ["gpt-4o"]},
        chat={"personas": {"poet": {"system": "Write verse.", "model": "claude-x"}}},
    )

    outcome = await doctor(settings)

    assert outcome.line("✗ model gpt-9-turbo:") == (
        f"✗ model gpt-9-turbo: {llm.base_url} does not offer it (llm.model)"
    )
    assert outcome.fix_after("✗ model gpt-9-turbo:") == (
        "set llm.model to a model it offers: gpt-4.1-mini, gpt-4o, gpt-4o-mini"
    )
    assert outcome.line("✗ model claude-x:") == (
        f"✗ model claude-x: {llm.base_url} does not offer it (the persona poet's model)"
    )
    assert "model gpt-4o:" not in outcome.text
    assert outcome.line("! chat completion:") == (
        f"! chat completion: not tried: {llm.base_url} does not offer llm.model (gpt-9-turbo)"
    )
    assert not llm.requests_for(KEY, path="/v1/chat/completions")


# ---- output ----------------------------------------------------------------------------------


def test_results_render_as_the_documented_lines() -> None:
    assert render_result(Result.ok("store", "fine")) == ["✓ store: fine"]
    assert render_result(Result.fail("bot", "no bot", "add it")) == [
        "✗ bot: no bot",
        "    fix: add it",
    ]
    assert render_result(Result.warn("scopes", "not checked")) == ["! scopes: not checked"]
    assert render_result(Result.manual("events", "add them")) == ["· events: add them"]
    report = Report([Result.ok("a", "x"), Result.fail("b", "y", "z"), Result.warn("c", "w")])
    assert summary(report) == (
        "doctor: 1 failed, 1 passed, 1 note. Fix the ✗ items above, then run `make doctor` again."
    )
    assert report.exit_code == 1


def test_a_secret_that_slips_into_a_result_is_masked_when_printed() -> None:
    out = io.StringIO()
    Printer(out, Redactor([APP_SECRET])).result(Result.fail("x", f"oops {APP_SECRET}", "fix"))
    assert APP_SECRET not in out.getvalue()
