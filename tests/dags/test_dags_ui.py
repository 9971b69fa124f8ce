"""`make airflow`'s configuration, seen through a real browser: log in, find both DAGs, open the trigger form."""
from __future__ import annotations

import json
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from chrome_devtools import Browser, find_or_install_chromium
from dag_runs import SCRIPT, free_port, run_script, script_env


@pytest.fixture(scope="module")
def airflow_ui(tmp_path_factory):
    """The API server (UI) configured by dags/standalone.sh, with both DAGs serialised."""
    home = tmp_path_factory.mktemp("airflow-ui-home")
    env = script_env(home, free_port(), tmp_path_factory.mktemp("ui-lake"))
    setup = subprocess.run(["bash", str(SCRIPT), "dags", "reserialize"], env=env, cwd=SCRIPT.parents[1],
                           capture_output=True, text=True, timeout=400)
    assert setup.returncode == 0, setup.stderr[-3000:]
    with run_script(["api-server"], env, home / "api-server.log") as base:
        yield {"base": base, "home": home, "setup_output": setup.stderr}


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
    for label in ("Include code groups", "Exclude code groups", "Minimum age (years)", "First index date",
                  "Step (days)"):
        assert label in form, f"{label!r} missing from the cohort form: {form!r}"
