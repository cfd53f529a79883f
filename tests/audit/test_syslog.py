"""The audit files forwarded to a real rsyslog over TLS (RFC 5425): every record arrives in
the DICOM format, once, in order, also across a collector outage and a forwarder restart,
and the outage never holds up the code that writes records."""

from __future__ import annotations

import re
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import wait_for
from syslogcollector import Collector

from cxrnode.audit import auditor
from cxrnode.audit import messages as m
from cxrnode.audit.syslog import SyslogForwarder, frame
from cxrnode.settings import Settings

pytestmark = pytest.mark.slow
#: The outage the test holds the collector down for: a minute, long enough for many failed
#: reconnects at RETRY seconds each and for TCP to give up on the old connection.
OUTAGE_SECONDS = 60.0
RETRY = 2.0
HEADER = re.compile(r"^<85>1 \S+ \S+ cxrnode - IHE\+RFC-3881 - (<AuditMessage>.*</AuditMessage>)$")


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    found = Collector(tmp_path / "collector")
    found.start()
    try:
        yield found
    finally:
        found.stop()


def settings_for(tmp_path: Path, collector: Collector) -> Settings:
    return Settings(
        data_dir=tmp_path / "node", audit_syslog=collector.url, audit_syslog_ca=collector.ca
    )


class Running:
    """A forwarder thread, as `cxrnode serve` runs it."""

    def __init__(self, settings: Settings) -> None:
        self.forwarder = SyslogForwarder(settings, auditor(settings).files, retry_seconds=RETRY)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.forwarder.run, args=(self.stop, 0.2))
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def received_users(collector: Collector) -> list[str]:
    users = []
    for line in collector.messages():
        match = HEADER.match(line)
        assert match, line[:200]
        message = ET.fromstring(match.group(1))
        users.append(message.find("ActiveParticipant").get("UserID"))  # type: ignore[union-attr]
    return users


def emit(settings: Settings, names: list[str]) -> None:
    a = auditor(settings)
    for name in names:
        a.emit(m.user_authentication(a.node, name, "10.0.0.7", login=True, ok=True))


def test_a_record_arrives_as_rfc5424_over_tls_with_the_dicom_message(
    tmp_path: Path, collector: Collector
) -> None:
    settings = settings_for(tmp_path, collector)
    emit(settings, ["alice"])
    forwarder = SyslogForwarder(settings, auditor(settings).files)
    assert forwarder.send_pending() == 1
    wait_for(lambda: collector.messages(), 20, "the collector to write the message")
    (line,) = collector.messages()
    match = HEADER.match(line)
    assert match, line
    message = ET.fromstring(match.group(1))
    assert message.find("EventIdentification/EventID").get("csd-code") == "110114"  # type: ignore[union-attr]
    assert forwarder.send_pending() == 0, "nothing is sent twice"
    framed = frame('<AuditMessage EventDateTime="2026-01-02T03:04:05.000+00:00"/>', "h")
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(rest), "RFC 5425 octet counting"


def test_a_collector_outage_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, collector: Collector
) -> None:
    settings = settings_for(tmp_path, collector)
    running = Running(settings)
    try:
        before = [f"before-{i}" for i in range(20)]
        emit(settings, before)
        wait_for(lambda: len(collector.messages()) == 20, 30, "the first records")
        wait_for(
            lambda: not list(auditor(settings).files.after(auditor(settings).files.cursor())),
            10,
            "the forwarder to be idle",
        )
        collector.stop()
        during = [f"during-{i}" for i in range(30)]
        down_until = time.monotonic() + OUTAGE_SECONDS
        for i, name in enumerate(during):
            emit(settings, [name])
            # written locally at once, whatever the collector does
            assert f'UserID="{name}"' in list(auditor(settings).files.records())[-1]
            time.sleep(max(0.0, (down_until - time.monotonic()) / (len(during) - i)))
        assert len(collector.messages()) == 20, "nothing arrives while it is down"
        collector.start()
        wait_for(lambda: len(collector.messages()) >= 50, 60, "the spooled records")
        running.close()  # a node restart: a new forwarder resumes at the cursor
        after = [f"after-{i}" for i in range(5)]
        emit(settings, after)
        running = Running(settings)
        wait_for(lambda: len(collector.messages()) >= 55, 30, "the records after a restart")
        time.sleep(2 * RETRY)  # room for a duplicate to show up, if one were sent
    finally:
        running.close()
    users = received_users(collector)
    assert Counter(users) == Counter(before + during + after), "each record exactly once"
    assert users == before + during + after, "in order"
