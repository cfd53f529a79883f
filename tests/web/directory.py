"""A real directory for the tests: OpenLDAP's slapd (Debian slapd + ldap-utils) started with
a temporary configuration on free ports, LDAP with StartTLS and LDAPS, a service account, a
few users and groups (loaded with ldapadd over StartTLS)."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from services import free_port, port_open, wait_for
from tlscerts import make_certificates

SUFFIX = "dc=example,dc=org"
ADMIN_DN = f"cn=admin,{SUFFIX}"
ADMIN_PASSWORD = "directory-admin-pw"
SERVICE_DN = f"uid=cxrnode-svc,ou=services,{SUFFIX}"
SERVICE_PASSWORD = "service-account-pw"
GROUPS = {
    "admin": f"cn=cxr-admins,ou=groups,{SUFFIX}",
    "operator": f"cn=cxr-operators,ou=groups,{SUFFIX}",
    "viewer": f"cn=cxr-viewers,ou=groups,{SUFFIX}",
}
#: user -> (password, groups)
USERS = {
    "rad.one": ("rad-one-password", ["operator", "viewer"]),
    "clerk": ("clerk-password", ["viewer"]),
    "boss": ("boss-password", ["admin"]),
    "outsider": ("outsider-password", []),
}


def _ldif() -> str:
    entries = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example",
        f"dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people",
        f"dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups",
        f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services",
        f"dn: {SERVICE_DN}\nobjectClass: inetOrgPerson\nuid: cxrnode-svc\ncn: cxrnode\n"
        f"sn: service\nuserPassword: {SERVICE_PASSWORD}",
    ]
    for user, (password, _) in USERS.items():
        entries.append(
            f"dn: uid={user},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: {user}\n"
            f"cn: {user}\nsn: {user}\nuserPassword: {password}"
        )
    for role, dn in GROUPS.items():
        members = [u for u, (_, roles) in USERS.items() if role in roles] or ["nobody"]
        lines = [f"dn: {dn}", "objectClass: groupOfNames", f"cn: {dn.split(',')[0][3:]}"]
        lines += [f"member: uid={u},ou=people,{SUFFIX}" for u in members]
        entries.append("\n".join(lines))
    return "\n\n".join(entries) + "\n"


@dataclass
class Directory:
    directory: Path
    port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    def start(self) -> Directory:
        self.ca, cert, key = make_certificates(self.directory / "tls")
        os.chmod(key, 0o600)
        db = self.directory / "db"
        db.mkdir(parents=True, exist_ok=True)
        hashed = subprocess.run(
            ["/usr/sbin/slappasswd", "-s", ADMIN_PASSWORD], capture_output=True, text=True
        ).stdout.strip()
        config = self.directory / "slapd.conf"
        config.write_text(
            f"""include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {self.directory / "slapd.pid"}
TLSCACertificateFile {self.ca}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
security simple_bind=128
database mdb
suffix "{SUFFIX}"
rootdn "{ADMIN_DN}"
rootpw {hashed}
directory {db}
maxsize 10485760
access to attrs=userPassword by self auth by anonymous auth by * none
access to * by users read by * none
"""
        )
        self.proc = subprocess.Popen(
            [
                "/usr/sbin/slapd",
                "-f",
                str(config),
                "-h",
                f"ldap://127.0.0.1:{self.port}/ ldaps://127.0.0.1:{self.tls_port}/",
                "-d",
                "0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(self.directory / "slapd.err").open("ab"),
        )
        try:
            self._load()
        except BaseException:
            self.stop()  # a directory that failed to start is not left running
            raise
        return self

    def _load(self) -> None:
        wait_for(lambda: port_open(self.port) and port_open(self.tls_port), 30, "slapd")
        added = subprocess.run(
            ["/usr/bin/ldapadd", "-x", "-ZZ", "-H", f"ldap://127.0.0.1:{self.port}"]
            + ["-D", ADMIN_DN, "-w", ADMIN_PASSWORD],
            input=_ldif(),
            text=True,
            capture_output=True,
            env={**os.environ, "LDAPTLS_CACERT": str(self.ca)},
            timeout=60,
        )
        assert added.returncode == 0, added.stderr

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)

    def settings(self, *, search: bool = True, ldaps: bool = True) -> dict[str, str]:
        """Node settings (lower-case names) for logins against this directory."""
        found = {
            "ldap_url": f"ldaps://localhost:{self.tls_port}"
            if ldaps
            else f"ldap://localhost:{self.port}",
            "ldap_ca_file": str(self.ca),
            "ldap_group_base": f"ou=groups,{SUFFIX}",
            "ldap_admin_groups": GROUPS["admin"],
            "ldap_operator_groups": GROUPS["operator"],
            "ldap_viewer_groups": GROUPS["viewer"],
        }
        if search:
            found.update(
                ldap_bind_dn=SERVICE_DN,
                ldap_bind_password=SERVICE_PASSWORD,
                ldap_user_base=f"ou=people,{SUFFIX}",
            )
        else:
            found["ldap_user_dn"] = f"uid={{user}},ou=people,{SUFFIX}"
        return found
