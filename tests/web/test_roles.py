"""Roles: every route of the web app declares the least role it needs; each refuses the role
below it; a token (API) and a session (dashboard) of each role do exactly what the role
allows; tokens are shown once, kept hashed, expire, are revoked, and record their last use.
Refusals are Security Alerts in the audit trail."""

from __future__ import annotations

import re
import sqlite3
import subprocess

import pytest
import requests
from services import BIN
from webnode import TOKEN, Site

ROLES = ("viewer", "operator", "admin")
RANK = {"public": -1, "viewer": 0, "operator": 1, "admin": 2}
CSRF = r'<meta name="csrf-token" content="([^"]+)">'
PASSWORD = "correct horse battery"
NO_STUDY = "1.2.826.0.1.3680043.10.9999.1"  # no such study: an allowed action answers 404


@pytest.fixture(scope="module")
def tokens(site: Site) -> dict[str, str]:
    """A service-account token of each role, made with the CLI (the token alone on the last
    line of its output)."""
    made = {}
    for role in ROLES:
        out = site.node.cli("token", "create", "--name", f"matrix-{role}", "--role", role)
        token = out.stdout.strip().splitlines()[-1]
        assert re.fullmatch(r"cxr_[A-Za-z0-9_-]{43}", token), out.stdout
        made[role] = token
    return made


@pytest.fixture(scope="module")
def browsers(site: Site) -> dict[str, tuple[requests.Session, str]]:
    """A dashboard session (and its CSRF token) for a local account of each role."""
    made = {}
    for role in ROLES:
        name = f"matrix-{role}"
        added = subprocess.run(
            [str(BIN / "cxrnode"), "user", "add", name, "--role", role, "--password-stdin"],
            input=PASSWORD + "\n",
            env=site.node.env,
            text=True,
            capture_output=True,
            timeout=120,
        )
        assert added.returncode == 0, added.stderr
        browser = requests.Session()
        page = browser.post(
            site.base + "/login", data={"username": name, "password": PASSWORD, "next": "/"}
        )
        assert page.status_code == 200 and page.url == site.base + "/", page.text[-500:]
        csrf = re.search(CSRF, page.text)
        assert csrf and f"{name} · {role}" in page.text
        made[role] = (browser, csrf.group(1))
    return made


def route_table(site: Site) -> dict[str, str]:
    answer = site.api("GET", "/api/v1/roles")
    assert answer.status_code == 200, answer.text
    return answer.json()


def concrete(site: Site, path: str) -> str:
    return (
        path.replace("{study_uid}", NO_STUDY)
        .replace("{output_id}", "999999")
        .replace("{urgent_id}", "999999")
        .replace("{name}", "no-such-token")
    )


def test_every_route_of_the_openapi_schema_and_the_dashboard_declares_a_role(site: Site) -> None:
    table = route_table(site)
    schema = requests.get(site.base + "/api/v1/openapi.json", timeout=10).json()
    open_by_setting = {"/healthz", "/readyz", "/metrics"}  # HEALTH_OPEN, METRICS_OPEN
    for path, methods in schema["paths"].items():
        for method in methods:
            role = table[f"{method.upper()} {path}"]
            assert role in RANK and (role != "public" or path in open_by_setting), (method, path)
    pages = {k for k in table if not k.split(" ", 1)[1].startswith("/api/")}
    assert {"GET /", "GET /studies", "GET /studies/{study_uid}", "GET /admin"} <= pages
    assert table["POST /actions/rerun/{study_uid}"] == "operator"
    assert table["GET /admin"] == table["POST /api/v1/tokens"] == "admin"
    public = {k for k, v in table.items() if v == "public"}
    assert public <= {
        "GET /login", "POST /login", "GET /favicon.ico", "GET /api/v1/openapi.json",
        "GET /healthz", "GET /readyz", "GET /metrics",
    }  # fmt: skip


def _api_call(site: Site, method: str, path: str, token: str) -> requests.Response:
    body = None
    if method == "POST" and path == "/api/v1/tokens":
        body = {"name": "x" * 65, "role": "viewer"}  # refused as invalid (422) once allowed
    return site.api(method, concrete(site, path), token=token, json=body)


def test_a_token_of_each_role_does_exactly_what_its_role_allows(
    site: Site, tokens: dict[str, str]
) -> None:
    table = route_table(site)
    api = {k: v for k, v in table.items() if k.split(" ", 1)[1].startswith("/api/v1/")}
    assert len(api) >= 15
    for key, needed in api.items():
        if needed == "public":
            continue
        method, path = key.split(" ", 1)
        for role, token in tokens.items():
            answer = _api_call(site, method, path, token)
            if RANK[role] < RANK[needed]:
                assert answer.status_code == 403, (role, key, answer.text)
                assert f"needs the {needed} role" in answer.json()["detail"]
            else:
                assert answer.status_code not in (401, 403), (role, key, answer.text)
                assert answer.status_code < 500, (role, key, answer.text)


def test_a_session_of_each_role_does_exactly_what_its_role_allows_on_the_dashboard(
    site: Site, browsers: dict[str, tuple[requests.Session, str]]
) -> None:
    table = route_table(site)
    dashboard = {
        k: v
        for k, v in table.items()
        if not k.split(" ", 1)[1].startswith(("/api/", "/login", "/logout", "/favicon"))
        and v != "public"
    }
    assert len(dashboard) >= 7
    for key, needed in dashboard.items():
        method, path = key.split(" ", 1)
        url = site.base + concrete(site, path)
        for role, (browser, csrf) in browsers.items():
            if method == "GET":
                answer = browser.get(url, allow_redirects=False)
            else:
                answer = browser.post(url, data={"csrf_token": csrf}, allow_redirects=False)
            if RANK[role] < RANK[needed]:
                assert answer.status_code == 403, (role, key, answer.status_code)
            else:
                # a page (200, or 404 for the absent study) or an action's redirect (303)
                assert answer.status_code in (200, 303, 404), (role, key, answer.status_code)


def test_tokens_are_stored_hashed_and_expire_revoke_and_record_their_last_use(
    site: Site, tokens: dict[str, str]
) -> None:
    assert site.api("GET", "/api/v1/summary", token=tokens["viewer"]).status_code == 200
    db = sqlite3.connect(site.node.data_dir / "cxrnode.db")
    rows = dict(db.execute("SELECT name, token_hash FROM api_tokens").fetchall())
    for token in tokens.values():
        assert not any(token in h or h in token for h in rows.values()), "only a hash is kept"
    listed = site.node.cli("token", "list").stdout
    assert "matrix-viewer\tviewer" in listed and tokens["viewer"] not in listed
    used = db.execute(
        "SELECT last_used_at FROM api_tokens WHERE name = 'matrix-viewer'"
    ).fetchone()[0]
    assert used is not None

    # expired: a token made with a lifetime, moved into the past
    out = site.node.cli(
        "token", "create", "--name", "short-lived", "--role", "admin", "--expires", "1h"
    )
    short = out.stdout.strip().splitlines()[-1]
    assert site.api("GET", "/api/v1/summary", token=short).status_code == 200
    with db:
        db.execute(
            "UPDATE api_tokens SET expires_at = '2000-01-01 00:00:00' WHERE name = 'short-lived'"
        )
    assert site.api("GET", "/api/v1/summary", token=short).status_code == 403

    # revoked through the API by an admin token; the revoked one is refused at once
    out = site.node.cli("token", "create", "--name", "to-revoke", "--role", "operator")
    doomed = out.stdout.strip().splitlines()[-1]
    assert site.api("GET", "/api/v1/summary", token=doomed).status_code == 200
    gone = site.api("DELETE", "/api/v1/tokens/to-revoke", token=tokens["admin"])
    assert gone.status_code == 204, gone.text
    assert site.api("GET", "/api/v1/summary", token=doomed).status_code == 403
    db.close()


def test_an_admin_token_makes_a_token_shown_once_and_api_token_stays_the_bootstrap_admin(
    site: Site, tokens: dict[str, str]
) -> None:
    made = site.api(
        "POST", "/api/v1/tokens", token=TOKEN, json={"name": "made-by-api", "role": "viewer"}
    )
    assert made.status_code == 201, made.text
    token = made.json()["token"]
    assert site.api("GET", "/api/v1/studies", token=token).status_code == 200
    listed = site.api("GET", "/api/v1/tokens", token=tokens["admin"]).json()
    assert {"made-by-api", "matrix-admin"} <= {t["name"] for t in listed}
    assert all("token" not in t for t in listed)
    settings = site.api("GET", "/api/v1/settings", token=TOKEN).json()
    assert settings["api_token"] == "***"


def test_refusals_are_security_alerts_in_the_audit_trail(
    site: Site, tokens: dict[str, str]
) -> None:
    before = _audit_lines(site)
    refused = site.api("POST", "/api/v1/outputs/resend-dead", token=tokens["viewer"])
    assert refused.status_code == 403
    assert site.api("GET", "/api/v1/summary", token="cxr_" + "x" * 43).status_code == 403
    new = _audit_lines(site)[len(before) :]
    alerts = [line for line in new if 'csd-code="110113"' in line]
    assert any('UserID="matrix-viewer"' in a and "resend-dead" in a for a in alerts), new
    assert any('UserID="unknown"' in a and "wrong, expired or revoked" in a for a in alerts)
    allowed = site.api("POST", "/api/v1/outputs/resend-dead", token=tokens["operator"])
    assert allowed.status_code == 202
    begun = [x for x in _audit_lines(site)[len(before) :] if 'csd-code="110102"' in x]
    assert any('UserID="matrix-operator"' in x and "dead letters" in x for x in begun)


def _audit_lines(site: Site) -> list[str]:
    audit = site.node.data_dir / "audit"
    lines: list[str] = []
    for path in sorted(audit.glob("audit-*.log")):
        lines.extend(path.read_text().splitlines())
    return lines
