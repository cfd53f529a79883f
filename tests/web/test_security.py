"""Directory logins against a real slapd (search-then-bind over LDAPS, bind-as-user over
StartTLS, group membership -> role), login lock-out as a Security Alert, session idle
timeout, the web app's own HTTPS with HSTS, and secrets read from CXRNODE_<NAME>_FILE and
never shown by `config show` or the log."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from directory import USERS, Directory
from services import BIN, node_env, port_open, wait_for
from tlscerts import make_certificates

CSRF = r'<meta name="csrf-token" content="([^"]+)">'


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Directory]:
    server = Directory(tmp_path_factory.mktemp("slapd")).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def web_app(tmp_path: Path, scheme: str = "http", **settings: str) -> Iterator[tuple[str, Path]]:
    """The web process alone (`run_web`) on a migrated, empty data directory: its base URL
    and its data directory."""
    data = tmp_path / "web"
    env = node_env(data, **settings)
    (data / "tmp").mkdir(parents=True)
    subprocess.run(
        [str(BIN / "cxrnode"), "db", "upgrade"], env=env, check=True, capture_output=True
    )
    code = "from cxrnode.settings import get_settings; from cxrnode.web.server import run_web; run_web(get_settings())"
    log = (tmp_path / "web.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=log)
    port = int(env["CXRNODE_HTTP_PORT"])
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, 60, "the web app")
        assert proc.poll() is None, (tmp_path / "web.log").read_text()
        yield f"{scheme}://localhost:{port}", data
    finally:
        proc.terminate()
        proc.wait(20)


def audit_lines(data: Path) -> list[str]:
    lines: list[str] = []
    for path in sorted((data / "audit").glob("audit-*.log")):
        lines.extend(path.read_text().splitlines())
    return lines


def login(base: str, name: str, password: str, **kw: object) -> requests.Response:
    return requests.post(
        base + "/login",
        data={"username": name, "password": password, "next": "/"},
        allow_redirects=False,
        timeout=30,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("mode", ["search-then-bind over LDAPS", "bind as the user, StartTLS"])
def test_directory_users_log_in_with_the_role_their_groups_give(
    tmp_path: Path, slapd: Directory, mode: str
) -> None:
    search = mode.startswith("search")
    with web_app(tmp_path, **slapd.settings(search=search, ldaps=search)) as (base, data):
        for user, role in (("rad.one", "operator"), ("clerk", "viewer"), ("boss", "admin")):
            answer = login(base, user, USERS[user][0])
            assert answer.status_code == 303, (user, answer.text[-300:])
            page = requests.get(base + "/", cookies=answer.cookies, timeout=30)
            assert page.status_code == 200 and f"{user} · {role}" in page.text
        assert login(base, "rad.one", "wrong-password").status_code == 401
        assert login(base, "outsider", USERS["outsider"][0]).status_code == 401, "no group"
        assert login(base, "rad*", "x").status_code == 401, "filter characters are escaped"
        assert login(base, "rad.one", "").status_code == 401, "no unauthenticated bind"
        records = audit_lines(data)
    logins = [r for r in records if 'csd-code="110114"' in r]
    assert sum('EventOutcomeIndicator="0"' in r for r in logins) == 3
    assert any('UserID="outsider"' in r and "in none of the groups" in r for r in logins)
    assert any('UserID="rad.one"' in r and "wrong password" in r for r in logins)


def test_repeated_failures_lock_out_the_name_and_are_a_security_alert(
    tmp_path: Path, slapd: Directory
) -> None:
    with web_app(
        tmp_path, login_max_failures="3", login_lockout_minutes="10", **slapd.settings()
    ) as (base, data):
        for _ in range(3):
            assert login(base, "clerk", "guess").status_code == 401
        locked = login(base, "clerk", USERS["clerk"][0])
        assert locked.status_code == 429 and "Too many failed logins" in locked.text
        records = audit_lines(data)
    alerts = [r for r in records if 'csd-code="110113"' in r]
    assert len(alerts) == 1 and 'UserID="clerk"' in alerts[0] and "locked out" in alerts[0]
    assert any("locked out after failed logins" in r for r in records if "110114" in r)


def test_a_session_ends_after_the_idle_timeout_and_the_page_refresh_does_not_extend_it(
    tmp_path: Path,
) -> None:
    with web_app(tmp_path, api_token="idle-test-token-0123456789", session_idle_minutes="0.1") as (
        base,
        _,
    ):
        browser = requests.Session()
        answer = browser.post(base + "/login", data={"token": "idle-test-token-0123456789"})
        assert answer.status_code == 200 and "api-token · admin" in answer.text
        time.sleep(3.5)
        refresh = browser.get(base + "/", headers={"X-Cxrnode-Refresh": "1"}, allow_redirects=False)
        assert refresh.status_code == 200
        time.sleep(3.5)  # 7 s since the last real use: past the 6 s idle timeout
        gone = browser.get(base + "/", allow_redirects=False)
        assert gone.status_code == 303 and gone.headers["location"].startswith("/login")


def test_the_web_app_serves_https_with_hsts_and_the_security_headers(tmp_path: Path) -> None:
    ca, cert, key = make_certificates(tmp_path / "tls")
    with web_app(
        tmp_path,
        scheme="https",
        api_token="tls-test-token-0123456789",
        http_tls_cert=str(cert),
        http_tls_key=str(key),
    ) as (base, _):
        page = requests.get(base + "/login", verify=str(ca), timeout=30)
        assert page.status_code == 200
        headers = page.headers
        assert headers["strict-transport-security"].startswith("max-age=")
        assert (
            headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
        )
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        answer = requests.post(
            base + "/login",
            data={"token": "tls-test-token-0123456789"},
            verify=str(ca),
            allow_redirects=False,
            timeout=30,
        )
        assert answer.status_code == 303
        assert "secure" in answer.headers["set-cookie"].lower()
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(base.replace("https", "http") + "/login", timeout=10)


def test_secrets_come_from_files_and_config_show_never_prints_them(
    tmp_path: Path, slapd: Directory
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "api_token").write_text("file-token-0123456789abcdef\n")
    (secrets / "ldap").write_text(slapd.settings()["ldap_bind_password"] + "\n")
    (secrets / "db").write_text(f"sqlite:///{tmp_path / 'web' / 'cxrnode.db'}\n")
    settings = {k: v for k, v in slapd.settings().items() if k != "ldap_bind_password"}
    extra = {
        "api_token_file": str(secrets / "api_token"),
        "ldap_bind_password_file": str(secrets / "ldap"),
        "database_url_file": str(secrets / "db"),
    }
    with web_app(tmp_path, **settings, **extra) as (base, data):
        assert login(base, "clerk", USERS["clerk"][0]).status_code == 303, "bind password read"
        ok = {"Authorization": "Bearer file-token-0123456789abcdef"}
        assert requests.get(base + "/api/v1/summary", headers=ok, timeout=30).status_code == 200
        env = node_env(data, **settings, **extra)
        shown = subprocess.run(
            [str(BIN / "cxrnode"), "config", "show"], env=env, capture_output=True, text=True
        )
    assert shown.returncode == 0, shown.stderr
    values = json.loads(shown.stdout)
    assert values["api_token"] == values["ldap_bind_password"] == "***"
    for secret in ("file-token-0123456789abcdef", slapd.settings()["ldap_bind_password"]):
        assert secret not in shown.stdout
        assert secret not in (tmp_path / "web.log").read_text()
    both = node_env(data, api_token="x" * 20, api_token_file=str(secrets / "api_token"))
    clash = subprocess.run(
        [str(BIN / "cxrnode"), "config", "show"], env=both, capture_output=True, text=True
    )
    assert clash.returncode == 2 and "keep one" in clash.stderr


def test_no_patient_data_reaches_a_url_of_the_dashboard() -> None:
    """Links and redirects carry UIDs, states, dates of arrival and notice codes only."""
    templates = Path(__file__).parents[2] / "cxrnode" / "web" / "templates"
    for template in templates.glob("*.html"):
        for href in re.findall(r'(?:href|action)="([^"]*)"', template.read_text()):
            assert not re.search(r"patient|name|birth", href, re.I), (template.name, href)
