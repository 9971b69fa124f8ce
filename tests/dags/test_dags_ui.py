"""`make airflow`'s configuration, seen through a real browser: log in, find both DAGs, open the trigger form."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from chrome_devtools import Browser, find_or_install_chromium

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "dags" / "standalone.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script_env(home: Path, port: int, lake: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AIRFLOW") and not k.startswith("MEDSCREEN_")}
    env.update({"AIRFLOW_HOME": str(home), "AIRFLOW_PORT": str(port),
                "MEDSCREEN_LAKE__ROOT": str(lake)})
    return env


@pytest.fixture(scope="module")
def airflow_ui(tmp_path_factory):
    """The API server (UI) configured by dags/standalone.sh, with both DAGs serialised."""
    home = tmp_path_factory.mktemp("airflow-ui-home")
    port = _free_port()
    env = _script_env(home, port, tmp_path_factory.mktemp("ui-lake"))
    setup = subprocess.run(["bash", str(SCRIPT), "dags", "reserialize"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=400)
    assert setup.returncode == 0, setup.stderr[-3000:]
    log = open(home / "api-server.log", "w")
    server = subprocess.Popen(["bash", str(SCRIPT), "api-server"], env=env, cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(base + "/api/v2/monitor/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("api-server did not come up: "
                                       + (home / "api-server.log").read_text()[-3000:]) from None
                time.sleep(1)
        yield {"base": base, "home": home, "setup_output": setup.stderr}
    finally:
        # The server and the workers it forked share the session this Popen started.
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def browser():
    b = Browser(find_or_install_chromium())
    yield b
    b.close()


def test_script_generates_a_private_admin_password(airflow_ui) -> None:
    pw_file = Path(airflow_ui["home"]) / "admin-password.json"
    assert str(pw_file) in airflow_ui["setup_output"]  # the script tells you where it is
    assert stat.S_IMODE(pw_file.stat().st_mode) == 0o600
    assert len(json.loads(pw_file.read_text())["admin"]) >= 16


def test_api_refuses_unauthenticated_requests(airflow_ui) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(airflow_ui["base"] + "/api/v2/dags", timeout=30)
    assert err.value.code in (401, 403)


def test_login_find_dags_and_open_trigger_form(airflow_ui, browser) -> None:
    base = airflow_ui["base"]
    password = json.loads((Path(airflow_ui["home"]) / "admin-password.json").read_text())["admin"]
    browser.navigate(base + "/")
    browser.wait_for("location.pathname.startsWith('/auth/login') && "
                     "!!document.querySelector('input[name=password]')", what="the login form")
    browser.type_into("input[name=username]", "admin")
    browser.type_into("input[name=password]", "wrong-" + password)
    browser.click("button[type=submit]")
    time.sleep(2)
    assert browser.evaluate("location.pathname").startswith("/auth/login"), "a wrong password got in"
    browser.navigate(base + "/auth/login?next=%2F")
    browser.wait_for("!!document.querySelector('input[name=password]')", what="the login form")
    browser.type_into("input[name=username]", "admin")
    browser.type_into("input[name=password]", password)
    browser.click("button[type=submit]")
    browser.wait_for("!location.pathname.startsWith('/auth')", what="leaving the login page")

    browser.navigate(base + "/dags")
    browser.wait_for("document.body.innerText.includes('nightly_screening') && "
                     "document.body.innerText.includes('cohort_retrospective')", what="both DAGs listed")

    browser.navigate(base + "/dags/nightly_screening")
    browser.wait_for("!!document.querySelector('[data-testid=trigger-dag-button]')", what="Trigger button")
    browser.click("[data-testid=trigger-dag-button]")
    form = browser.wait_for(
        "(() => { const d = [...document.querySelectorAll('[role=dialog]')]"
        ".find(x => x.innerText.includes('Trigger Dag')); return d ? d.innerText : ''; })()",
        what="the trigger form")
    for label in ("As-of date (UTC)", "Models", "Patient limit", "Backfill"):
        assert label in form, f"{label!r} missing from the trigger form: {form!r}"

    browser.navigate(base + "/dags/cohort_retrospective")
    browser.wait_for("!!document.querySelector('[data-testid=trigger-dag-button]')", what="Trigger button")
    browser.click("[data-testid=trigger-dag-button]")
    form = browser.wait_for(
        "(() => { const d = [...document.querySelectorAll('[role=dialog]')]"
        ".find(x => x.innerText.includes('Trigger Dag') && x.innerText.includes('Cohort name'));"
        " return d ? d.innerText : ''; })()", what="the cohort trigger form")
    for label in ("Include ICD groups", "Exclude ICD groups", "Minimum age (years)", "First index date",
                  "Step (days)"):
        assert label in form, f"{label!r} missing from the cohort form: {form!r}"
