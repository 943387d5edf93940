"""The Feishu SDK's API services load on their first use (bot.feishu.sdk_loader).

Each test runs in a fresh interpreter, since the hook and what it loaded are per process.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.helpers import run_python

ON_DEMAND = "from bot.feishu import sdk_loader; sdk_loader.load_api_services_on_demand()\n"


def run_survey(code: str, *, on_demand: bool = True) -> object:
    """Run ``code`` in a fresh interpreter; return what it printed last, as JSON."""
    done = run_python((ON_DEMAND if on_demand else "") + textwrap.dedent(code), timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_bot_client_loads_only_the_services_it_answers_with() -> None:
    report = run_survey(
        """
        import json, sys
        import openai
        from lark_oapi.channel import FeishuChannel
        from bot.feishu import sdk_compat, sdk_loader
        before = sorted(sdk_loader.loaded_services())
        client = sdk_compat.build_client(
            app_id="cli_a", app_secret="s", domain="https://open.feishu.cn", timeout_s=3
        )
        api_modules = [name for name in sys.modules if name.startswith("lark_oapi.api.")]
        print(json.dumps({
            "before": before,
            "after": sorted(sdk_loader.loaded_services()),
            "im": type(client.im).__name__,
            "drive": repr(client.drive),
            "api_modules": len(api_modules),
        }))
        """
    )
    assert isinstance(report, dict)
    api_modules = report.pop("api_modules")
    assert report == {
        "before": [],
        "after": ["auth", "cardkit", "im"],
        "im": "ImService",  # the SDK's own object: nothing in between on the answer path
        "drive": "<DriveService on demand, not loaded yet>",
    }
    # The full SDK has about 9,700 API modules; the bot's three services and the event models
    # of the dispatcher are a small part of them.
    assert api_modules < 2_000


def test_a_service_the_bot_does_not_use_still_works_on_first_use() -> None:
    report = run_survey(
        """
        import json
        import lark_oapi as lark
        from bot.feishu import sdk_loader
        client = lark.Client.builder().app_id("cli_a").app_secret("s").build()
        file_resource = client.drive.v1.file
        from lark_oapi.api.bitable.v1 import AppTable, CreateAppTableRequest
        request = CreateAppTableRequest.builder().app_token("app").build()
        print(json.dumps({
            "file": type(file_resource).__module__ + "." + type(file_resource).__name__,
            "list": callable(file_resource.alist),
            "table": AppTable.__module__,
            "request": request.app_token,
            "root": lark.vc.v1.ListAlertRequest.__module__,
            "package": lark.api.hire.v1.Application.__module__,
            "loaded": sorted(sdk_loader.loaded_services() - {"im", "cardkit", "auth"}),
        }))
        """
    )
    assert report == {
        "file": "lark_oapi.api.drive.v1.resource.file.File",
        "list": True,
        "table": "lark_oapi.api.bitable.v1.model.app_table",
        "request": "app",
        "root": "lark_oapi.api.vc.v1.model.list_alert_request",
        "package": "lark_oapi.api.hire.v1.model.application",
        "loaded": ["bitable", "drive", "hire", "vc"],
    }


def test_a_name_no_service_has_is_an_attribute_error_as_before() -> None:
    report = run_survey(
        """
        import json
        import lark_oapi as lark
        from lark_oapi.api.im import v1
        errors = []
        for reach in (lambda: lark.no_such_service, lambda: v1.NoSuchModel):
            try:
                reach()
            except AttributeError as exc:
                errors.append(str(exc))
        try:
            from lark_oapi.api.im.v1 import NoSuchModel
        except ImportError as exc:
            errors.append(type(exc).__name__)
        print(json.dumps(errors))
        """
    )
    assert report == [
        "module 'lark_oapi' has no attribute 'no_such_service'",
        "module 'lark_oapi.api.im.v1' has no attribute 'NoSuchModel'",
        "ImportError",
    ]


def test_threads_that_first_use_one_service_together_get_the_same_loaded_service() -> None:
    report = run_survey(
        """
        import json, threading
        import lark_oapi as lark
        client = lark.Client.builder().app_id("cli_a").app_secret("s").build()
        start = threading.Barrier(8)
        seen = []
        def use():
            start.wait()
            seen.append(type(client.drive.v1.file).__name__ + ":" + str(id(client.drive.v1)))
        threads = [threading.Thread(target=use) for _ in range(8)]
        for thread in threads: thread.start()
        for thread in threads: thread.join()
        print(json.dumps(sorted(set(seen))))
        """
    )
    assert isinstance(report, list)
    assert len(report) == 1
    assert report[0].startswith("File:")


def test_the_command_line_installs_the_hook_before_anything_imports_the_sdk() -> None:
    report = run_survey(
        """
        import json, sys
        from bot import cli
        from bot.feishu import sdk_loader
        imported_early = "lark_oapi" in sys.modules
        try:
            cli.main(["keys", "--help"])
        except SystemExit:
            pass
        print(json.dumps([imported_early, sdk_loader.is_installed()]))
        """,
        on_demand=False,
    )
    assert report == [False, True]


def test_an_sdk_version_outside_the_tested_range_loads_whole_as_before() -> None:
    report = run_survey(
        """
        import importlib.metadata, json, sys
        real_version = importlib.metadata.version
        importlib.metadata.version = (
            lambda name: "1.8.0" if name == "lark-oapi" else real_version(name)
        )
        from bot import cli
        from bot.feishu import sdk_loader
        try:
            cli.main(["keys", "--help"])
        except SystemExit:
            pass
        print(json.dumps(sdk_loader.is_installed()))
        """,
        on_demand=False,
    )
    assert report is False


@pytest.mark.slow
def test_every_service_on_demand_holds_the_names_the_sdk_gives_it() -> None:
    survey = r"""
        import importlib, json, pathlib, pkgutil, re
        import lark_oapi as lark
        from lark_oapi.api import __path__ as api_path
        client = lark.Client.builder().app_id("cli_a").app_secret("s").build()
        # The services `import lark_oapi` loads (the folder holds a few it does not).
        init = (pathlib.Path(api_path[0]) / "__init__.py").read_text()
        services = sorted(re.findall(r"^from \. import (\w+)$", init, re.MULTILINE))
        assert len(services) > 50, services
        names = {}
        for service in services:
            package = importlib.import_module("lark_oapi.api." + service)
            for version in sorted(info.name for info in pkgutil.iter_modules(package.__path__)):
                resources = getattr(getattr(client, service, None), version, None)
                module = getattr(package, version, None)
                if module is None or not hasattr(module, "__path__"):
                    continue
                public = sorted(name for name in vars(module) if not name.startswith("_"))
                names[service + "." + version] = public
                names[service + "." + version + " on the client"] = sorted(
                    name for name in vars(resources) if not name.startswith("_")
                ) if resources is not None else None
        print(json.dumps(names))
        """
    assert run_survey(survey, on_demand=True) == run_survey(survey, on_demand=False)
