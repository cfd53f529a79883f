"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright.

An admin logs in with the token, sees the queues, the studies and the failure, opens a study
whose outputs are dead letters, presses Resend, and the output reaches the PACS. Screenshots
are kept in ARTIFACTS/screenshots (outside the source tree) for a person to look at.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from webnode import ARTIFACTS, TOKEN, Site

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = ARTIFACTS / "screenshots"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console",
        lambda message: errors.append(message.text) if message.type == "error" else None,
    )
    yield page
    context.close()
    assert errors == [], "the page reported errors"


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_an_admin_logs_in_sees_the_node_and_resends_a_dead_letter(site: Site, page: Page) -> None:
    uid, (output, _) = site.fresh_dead_letters()

    page.goto(site.base + "/")
    expect(page).to_have_url(site.base + "/login?next=/")
    shot(page, "login")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    expect(page).to_have_url(site.base + "/")

    queues = page.locator("#queues")
    for queue in ("prepare", "infer", "outputs", "send"):
        expect(queues.locator("td", has_text=queue).first).to_be_visible()
    expect(queues).to_contain_text("model loaded")
    expect(page.locator("#readiness")).to_contain_text("Ready")
    problems = page.locator("#problems")
    expect(problems).to_contain_text("image cannot be read")
    expect(problems).to_contain_text(f"#{output['id']}")
    recent = page.locator("#recent")
    expect(recent.locator("tbody tr").first).to_be_visible()
    expect(recent).to_contain_text("skipped")
    expect(recent).to_contain_text("failed")
    expect(page.locator("#agreement")).to_contain_text("Model agreement")
    shot(page, "overview")

    page.click("nav >> text=Studies")
    expect(page.locator("table.studies tbody tr")).to_have_count(
        site.get("/api/v1/studies")["total"]
    )
    page.select_option("select[name=state]", "failed")
    page.click("form.filters button")
    expect(page.locator("table.studies tbody tr")).to_have_count(1)
    shot(page, "studies-failed")
    page.click("table.studies a.uid")
    expect(page.locator(".callout.bad")).to_contain_text("image cannot be read")
    shot(page, "study-failed")

    page.goto(site.base + f"/studies/{uid}")
    row = page.locator(f"tr.output-row[data-output='{output['id']}']")
    expect(row).to_contain_text("dead")
    expect(page.locator(".draft .banner")).to_have_text("AI DRAFT — NOT VERIFIED")
    expect(page.locator("table.findings tr")).to_have_count(9)
    shot(page, "study-dead-letter")
    row.locator("button", has_text="Resend").click()
    expect(page.locator(".notice")).to_contain_text(f"Output {output['id']} is queued again")

    def delivered_now() -> bool:
        page.reload()
        return "delivered" in row.inner_text()

    from services import wait_for

    wait_for(delivered_now, 60, "the output to be delivered", interval=1)
    shot(page, "study-resent")
    detail = site.study(uid)
    mine = next(o for o in detail["outputs"] if o["id"] == output["id"])
    assert mine["state"] == "delivered"
    assert mine["sop_instance_uid"] in site.pacs.received()


def test_the_panels_refresh_themselves(site: Site, page: Page) -> None:
    page.goto(site.base + "/login")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    stamp = page.locator("#refreshed").inner_text()
    page.wait_for_function(
        "text => document.getElementById('refreshed').textContent !== text",
        arg=stamp,
        timeout=25000,
    )
    expect(page.locator("#queues")).to_contain_text("prepare")
