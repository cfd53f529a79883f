"""Who may do what: the bearer token on every API route and action, the dashboard's session
and CSRF token, cross-site requests, closed health and metrics, and the no-token mode."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from services import BIN, node_env, port_open, wait_for
from webnode import BIRTH_DATE, PATIENT_ID, PATIENT_NAME, TOKEN, Site

from cxrnode.settings import Settings
from cxrnode.web.server import exposure_problem

CSRF = r'<meta name="csrf-token" content="([^"]+)">'


def api_routes(site: Site) -> list[tuple[str, str]]:
    """Every (method, path) of the OpenAPI schema, with sample path parameters."""
    schema = requests.get(site.base + "/api/v1/openapi.json", timeout=10).json()
    routes = []
    for path, methods in schema["paths"].items():
        if not path.startswith("/api/v1/"):
            continue
        concrete = (
            path.replace("{study_uid}", site.delivered[0])
            .replace("{output_id}", "1")
            .replace("{name}", "nobody")
        )
        routes.extend((method.upper(), concrete) for method in methods)
    return routes


def test_every_api_route_and_action_is_refused_without_the_right_token(site: Site) -> None:
    routes = api_routes(site)
    assert {m for m, _ in routes} == {"GET", "POST", "DELETE"} and len(routes) >= 6
    before = site.get("/api/v1/summary")
    for method, path in routes:
        missing = site.api(method, path, token=None)
        assert missing.status_code == 401, (method, path, missing.text)
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = site.api(method, path, token=TOKEN + "x")
        assert wrong.status_code == 403, (method, path, wrong.text)
        cookie = site.api(method, path, token=None, cookies={"cxrnode_session": "forged"})
        assert cookie.status_code == 401, (method, path)
    after = site.get("/api/v1/summary")
    assert after["jobs"] == before["jobs"] and after["outputs"] == before["outputs"]


def test_a_cross_site_request_is_refused_even_with_the_token(site: Site) -> None:
    path = "/api/v1/outputs/resend-dead"
    assert site.api("POST", path, headers={"Origin": "http://evil.example"}).status_code == 403
    assert site.api("POST", path, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403


def login(site: Site) -> tuple[requests.Session, str]:
    """A browser-like session logged in to the dashboard, and a CSRF token from a page."""
    browser = requests.Session()
    answer = browser.post(site.base + "/login", data={"token": TOKEN, "next": "/studies"})
    assert answer.status_code == 200 and answer.url.endswith("/studies")
    cookie = next(c for c in browser.cookies if c.name == "cxrnode_session")
    assert cookie.has_nonstandard_attr("HttpOnly")
    csrf = re.search(CSRF, answer.text)
    assert csrf, "every page carries the session's CSRF token"
    return browser, csrf.group(1)


def test_dashboard_asks_for_the_token_once_and_actions_need_the_csrf_token(site: Site) -> None:
    page = requests.get(site.base + "/studies?state=failed", allow_redirects=False, timeout=10)
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=/studies%3Fstate%3Dfailed"
    refused = requests.post(site.base + "/login", data={"token": "nope"}, timeout=10)
    assert refused.status_code == 401 and "not right" in refused.text
    action = site.base + "/actions/resend-dead"
    assert requests.post(action, data={"csrf_token": "x"}, timeout=10).status_code == 401

    browser, csrf = login(site)
    assert browser.get(site.base + "/").status_code == 200
    assert browser.post(action, data={}, allow_redirects=False).status_code == 403
    assert browser.post(action, data={"csrf_token": csrf + "x"}).status_code == 403
    done = browser.post(action, data={"csrf_token": csrf, "back": "/"}, allow_redirects=False)
    assert done.status_code == 303 and done.headers["location"].startswith("/?notice=resent-dead")
    elsewhere = browser.post(action, data={"csrf_token": csrf, "back": "//evil.example/"})
    assert elsewhere.url.startswith(site.base + "/?"), "redirects stay on the node"
    out = browser.post(site.base + "/logout", data={"csrf_token": csrf}, allow_redirects=False)
    assert out.status_code == 303 and not browser.cookies.get("cxrnode_session")


def test_health_and_metrics_are_open_by_default(site: Site) -> None:
    assert requests.get(site.base + "/healthz", timeout=10).json()["status"] == "alive"
    assert requests.get(site.base + "/metrics", timeout=10).status_code == 200
    ready = requests.get(site.base + "/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["checks"]) == {
        "database", "broker", "data_dir", "scp", "workers", "model"
    }  # fmt: skip


def test_the_token_and_the_patient_never_reach_the_log(site: Site) -> None:
    browser, csrf = login(site)  # a login and an action of its own, whatever ran before
    browser.post(site.base + "/actions/resend-dead", data={"csrf_token": csrf, "back": "/"})
    log = site.node.log()
    assert "dashboard login" in log and "admin action" in log
    for secret in (TOKEN, PATIENT_ID, BIRTH_DATE, *PATIENT_NAME.split("^")):
        assert secret not in log


# ------------------------------------------------------------------ a web app of its own


@contextlib.contextmanager
def web_app_only(tmp_path: Path, **settings: str) -> Iterator[str]:
    """The web process alone (`run_web`) on a migrated, empty data directory."""
    data = tmp_path / "web-only"
    env = node_env(data, **settings)
    (data / "tmp").mkdir(parents=True)
    subprocess.run(
        [str(BIN / "cxrnode"), "db", "upgrade"], env=env, check=True, capture_output=True
    )
    code = "from cxrnode.settings import get_settings; from cxrnode.web.server import run_web; run_web(get_settings())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    port = int(env["CXRNODE_HTTP_PORT"])
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, 60, "the web app")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)


def test_closed_health_and_metrics_take_the_token(tmp_path: Path) -> None:
    with web_app_only(tmp_path, api_token=TOKEN, health_open="false", metrics_open="false") as base:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert requests.get(base + path, timeout=10).status_code == 401
            wrong = {"Authorization": f"Bearer {TOKEN}x"}
            assert requests.get(base + path, headers=wrong, timeout=10).status_code == 403
        right = {"Authorization": f"Bearer {TOKEN}"}
        assert requests.get(base + "/healthz", headers=right, timeout=10).status_code == 200
        assert requests.get(base + "/metrics", headers=right, timeout=10).status_code == 200
        ready = requests.get(base + "/readyz", headers=right, timeout=10)
        assert ready.status_code == 503  # no broker, no listener, no workers here
        checks = ready.json()["checks"]
        assert checks["database"]["ok"] and checks["data_dir"]["ok"]
        assert not checks["broker"]["ok"] and not checks["scp"]["ok"]


def test_without_a_token_the_loopback_web_app_asks_nothing_but_refuses_other_host_names(
    tmp_path: Path,
) -> None:
    with web_app_only(tmp_path) as base:
        assert requests.get(base + "/api/v1/studies", timeout=10).json()["total"] == 0
        page = requests.get(base + "/", timeout=10)
        assert page.status_code == 200 and "Log out" not in page.text
        assert 'class="role-admin"' in page.text, "nobody is asked: the actions are offered"
        rebound = requests.get(
            base + "/api/v1/studies", headers={"Host": "attacker.example:80"}, timeout=10
        )
        assert rebound.status_code == 403, "a DNS-rebound page cannot reach the node"
        browser = requests.Session()
        csrf = re.search(CSRF, browser.get(base + "/").text)
        assert csrf and browser.cookies.get("cxrnode_session")
        again = browser.get(base + "/").text
        assert 'class="role-admin"' in again, "also once the page has started a session"
        action = base + "/actions/resend-dead"
        assert browser.post(action, data={}).status_code == 403, "CSRF still applies"
        assert browser.post(action, data={"csrf_token": csrf.group(1)}).status_code == 200


@pytest.mark.parametrize(
    ("host", "token", "allow", "refused"),
    [
        ("127.0.0.1", None, False, False),
        ("::1", None, False, False),
        ("localhost", None, False, False),
        ("0.0.0.0", None, False, True),
        ("10.1.2.3", None, False, True),
        ("0.0.0.0", "long-enough-token-123", False, False),
        ("0.0.0.0", None, True, False),
    ],
)
def test_the_web_app_is_never_open_to_the_network_without_a_token_unless_allowed(
    host: str, token: str | None, allow: bool, refused: bool
) -> None:
    settings = Settings(http_host=host, api_token=token, http_allow_no_token=allow)
    assert (exposure_problem(settings) is not None) == refused


def test_serve_refuses_to_start_a_web_app_open_to_the_network(tmp_path: Path) -> None:
    env = node_env(tmp_path / "node", http_host="0.0.0.0")
    result = subprocess.run(
        [str(BIN / "cxrnode"), "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "without a token" in result.stderr and "CXRNODE_API_TOKEN" in result.stderr
    assert not (tmp_path / "node" / "cxrnode.db").exists(), "refused before anything started"
