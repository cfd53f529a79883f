"""A radiologist from the hospital directory, in a real browser, against a whole node that
logs in to slapd and sends its audit trail to rsyslog over TLS: they log in, list the
studies, open one, re-run it and log out; the node's audit file and the collector then hold,
in the DICOM audit format, the login, the query, the study opened, the re-run with their
name, and the logout, besides the node's own start and the instances it received.

Screenshots (login page, dashboard as the logged-in user) go to ARTIFACTS/screenshots."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from audit_schema import assert_valid
from directory import USERS, Directory
from playwright.sync_api import Browser, expect, sync_playwright
from services import Node, node_env, port_open, wait_for
from syslogcollector import Collector
from webnode import ARTIFACTS, FAST, Pacs, chest, delivered, study_uid

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
SHOTS = ARTIFACTS / "screenshots"
USER = "rad.one"  # an operator by the directory's groups


class Trail:
    """The node's audit records, parsed."""

    def __init__(self, lines: list[str]) -> None:
        assert_valid(lines)  # every record valid by the standard's schema
        self.messages = [ET.fromstring(line) for line in lines]

    def find(self, code: str, user: str | None = None, **checks: str) -> list[ET.Element]:
        found = []
        for message in self.messages:
            event = message.find("EventIdentification")
            assert event is not None
            if event.find("EventID").get("csd-code") != code:  # type: ignore[union-attr]
                continue
            users = [p.get("UserID") for p in message.findall("ActiveParticipant")]
            if user is not None and user not in users:
                continue
            if all(event.get(k) == v for k, v in checks.items()):
                found.append(message)
        return found


def file_trail(data_dir: Path) -> Trail:
    lines: list[str] = []
    for path in sorted((data_dir / "audit").glob("audit-*.log")):
        lines.extend(path.read_text().splitlines())
    return Trail(lines)


def collector_trail(collector: Collector) -> Trail:
    xml = re.compile(r"(<AuditMessage>.*</AuditMessage>)$")
    return Trail([xml.search(line).group(1) for line in collector.messages()])  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[tuple[Node, Directory, Collector, str, str]]:
    tmp = tmp_path_factory.mktemp("audit-trail")
    slapd = Directory(tmp / "slapd").start()
    collector = Collector(tmp / "collector")
    collector.start()
    pacs = Pacs(tmp / "pacs")
    pacs.start()
    fast = {k: v for k, v in FAST.items() if k != "api_token"}  # the directory only
    env = node_env(
        tmp / "node",
        model=str(tiny_model),
        destinations=pacs.destination,
        audit_syslog=collector.url,
        audit_syslog_ca=str(collector.ca),
        **slapd.settings(),
        **fast,
    )
    node = Node(tmp / "node", env)
    node.start()
    try:
        base = f"http://127.0.0.1:{env['CXRNODE_HTTP_PORT']}"
        wait_for(lambda: port_open(int(env["CXRNODE_HTTP_PORT"])), 60, "the web app")
        token = node.cli("token", "create", "--name", "test-watcher", "--role", "viewer")
        watcher = token.stdout.strip().splitlines()[-1]
        image = chest(tmp, "study", seed=31)
        from services import storescu

        assert storescu(node.port, image).returncode == 0
        uid = study_uid(image)
        import requests

        def done() -> bool:
            answer = requests.get(
                f"{base}/api/v1/studies/{uid}",
                headers={"Authorization": f"Bearer {watcher}"},
                timeout=30,
            )
            return answer.status_code == 200 and delivered(answer.json())

        wait_for(done, 180, "the study's draft to be delivered", interval=1)
        yield node, slapd, collector, base, uid
    finally:
        node.stop()
        pacs.stop()
        collector.stop()
        slapd.stop()
        (ARTIFACTS / "logs").mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "logs" / "audit-trail-serve.log").write_text(node.log())


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def test_a_directory_user_opens_and_reruns_a_study_and_the_trail_says_so(
    world: tuple[Node, Directory, Collector, str, str], browser: Browser
) -> None:
    node, _, collector, base, uid = world
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    page.goto(base + "/")
    expect(page).to_have_url(base + "/login?next=/")
    expect(page.locator("h1")).to_have_text("Log in")
    page.screenshot(path=str(SHOTS / "security-login.png"), full_page=True)
    page.fill("#username", USER)
    page.fill("#password", USERS[USER][0])
    page.click("button.primary")
    expect(page).to_have_url(base + "/")
    expect(page.locator(".top .who")).to_have_text(f"{USER} · operator")
    page.screenshot(path=str(SHOTS / "security-dashboard.png"), full_page=True)

    page.click("nav >> text=Studies")
    expect(page.locator("table.studies tbody tr")).to_have_count(1)
    page.click("table.studies a.uid")
    expect(page).to_have_url(base + f"/studies/{uid}")
    page.click("button:has-text('Re-run study')")
    expect(page.locator("div.notice")).to_contain_text("Re-run queued")
    page.click("button:has-text('Log out')")
    expect(page).to_have_url(re.compile(r"/login"))
    context.close()
    assert errors == []

    def expected(trail: Trail) -> bool:
        return bool(
            trail.find("110114", USER, EventOutcomeIndicator="0")
            and any(
                m.find("EventIdentification/EventTypeCode").get("csd-code") == "110123"  # type: ignore[union-attr]
                for m in trail.find("110114", USER)
            )
            and trail.find("110112", USER)
            and trail.find("110103", USER, EventActionCode="R")
            and trail.find("110103", USER, EventActionCode="C")
        )

    for name, read in (
        ("the audit file", lambda: file_trail(node.data_dir)),
        ("the rsyslog collector", lambda: collector_trail(collector)),
    ):
        wait_for(lambda read=read: expected(read()), 30, f"the user's events in {name}")
        trail = read()
        (rerun,) = trail.find("110103", USER, EventActionCode="C")
        objects = {
            o.get("ParticipantObjectTypeCodeRole"): o.get("ParticipantObjectID")
            for o in rerun.findall("ParticipantObjectIdentification")
        }
        assert objects["3"] == uid, "the study"
        assert objects["1"] == "PID-7391-QF", "the patient, as the standard asks"
        login = trail.find("110114", USER, EventOutcomeIndicator="0")[0]
        requestor = login.find("ActiveParticipant")
        assert requestor is not None and requestor.get("UserIsRequestor") == "true"
        assert requestor.get("NetworkAccessPointID") == "127.0.0.1"
        assert trail.find("110100"), "the node's start"
        received = trail.find("110104", "STORESCU", EventActionCode="C")
        assert received, "the instances received from the sender"
        assert trail.find("110104", "PACS", EventActionCode="R"), "the drafts sent"
    lines = [ET.tostring(m, encoding="unicode") for m in collector_trail(collector).messages]
    assert len(lines) == len(set(lines)), "nothing arrives twice"
