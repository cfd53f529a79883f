"""A real audit repository for the tests: rsyslog (Debian rsyslog + rsyslog-gnutls) receiving
RFC 5425 syslog over TLS with a certificate made by openssl, writing each message's raw text
to a file; started, stopped and started again on the same port at will."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from services import free_port, port_open, wait_for
from tlscerts import make_certificates

RSYSLOGD = "/usr/sbin/rsyslogd"


@dataclass
class Collector:
    directory: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.ca, cert, key = make_certificates(self.directory / "tls")
        (self.directory / "work").mkdir(exist_ok=True)
        self.received = self.directory / "received.log"
        self.config = self.directory / "rsyslog.conf"
        self.config.write_text(
            f"""
global(
  workDirectory="{self.directory / "work"}"
  DefaultNetstreamDriver="gtls"
  DefaultNetstreamDriverCAFile="{self.ca}"
  DefaultNetstreamDriverCertFile="{cert}"
  DefaultNetstreamDriverKeyFile="{key}"
  maxMessageSize="64k"
)
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"
       StreamDriver.AuthMode="anon")
input(type="imtcp" port="{self.port}")
template(name="raw" type="string" string="%rawmsg%\\n")
action(type="omfile" file="{self.received}" template="raw" flushOnTXEnd="on"
       asyncWriting="off")
"""
        )

    @property
    def url(self) -> str:
        return f"tls://localhost:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.config), "-i", str(self.directory / "pid")],
            stdout=subprocess.DEVNULL,
            stderr=(self.directory / "rsyslogd.err").open("ab"),
        )
        try:
            wait_for(lambda: port_open(self.port), 30, "rsyslogd to listen")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
        self.proc = None

    def messages(self) -> list[str]:
        """The raw syslog messages received (one a line)."""
        if not self.received.exists():
            return []
        return [line for line in self.received.read_text().splitlines() if line]
