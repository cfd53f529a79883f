"""Dashboard logins against the hospital directory (LDAP / Active Directory, ``ldap3``).

- The connection is encrypted before any password travels: ``ldaps://`` (TLS from the first
  byte) or ``ldap://`` upgraded with StartTLS (LDAP_START_TLS, on by default). The server's
  certificate is checked against LDAP_CA_FILE (or the system's CAs) and its name.
- **Bind as the user** when LDAP_USER_DN is a template (``uid={user},ou=people,...``), or
  **search, then bind**: the service account LDAP_BIND_DN finds the user's entry with
  LDAP_USER_FILTER under LDAP_USER_BASE, then the user's own password is tried on that DN.
- **Role from groups**: the groups whose LDAP_GROUP_FILTER names the user's DN (searched
  with the service account if there is one, else as the user) are matched against
  LDAP_ADMIN_GROUPS, LDAP_OPERATOR_GROUPS and LDAP_VIEWER_GROUPS; the highest wins. A user
  in none of them is refused (authenticated, but not authorised here).

The login name is escaped before it enters a filter or a DN (RFC 4515 / RFC 4514), and an
empty password is refused before any bind (an "unauthenticated bind" would succeed).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

from cxrnode.settings import Settings
from cxrnode.web.accounts import Role

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DirectoryAnswer:
    ok: bool
    role: Role | None = None
    why: str = ""


def _tls(settings: Settings):  # noqa: ANN202
    from ldap3 import Tls

    return Tls(
        validate=ssl.CERT_REQUIRED,
        version=ssl.PROTOCOL_TLS_CLIENT,
        ca_certs_file=str(settings.ldap_ca_file) if settings.ldap_ca_file else None,
    )


def _connection(settings: Settings, user: str | None, password: str | None):  # noqa: ANN202
    from ldap3 import Connection, Server

    url = settings.ldap_url or ""
    server = Server(url, use_ssl=url.startswith("ldaps://"), tls=_tls(settings), connect_timeout=5)
    conn = Connection(
        server,
        user=user,
        password=password,
        auto_bind=False,
        receive_timeout=10,
        raise_exceptions=False,
        check_names=False,  # filters may name attributes of AD or of OpenLDAP
    )
    conn.open()
    if url.startswith("ldap://") and settings.ldap_start_tls and not conn.start_tls():
        raise ConnectionError(f"StartTLS refused by the directory: {conn.result}")
    return conn


def authenticate(settings: Settings, name: str, password: str) -> DirectoryAnswer:
    """Check ``name`` / ``password`` against the directory and map its groups to a role."""
    from ldap3.utils.conv import escape_filter_chars
    from ldap3.utils.dn import escape_rdn

    if not password:
        return DirectoryAnswer(False, why="empty password")
    try:
        if settings.ldap_user_dn:
            user_dn = settings.ldap_user_dn.format(user=escape_rdn(name))
        else:
            service = _connection(
                settings,
                settings.ldap_bind_dn,
                settings.ldap_bind_password.get_secret_value()
                if settings.ldap_bind_password
                else None,
            )
            try:
                if not service.bind():
                    log.error("the directory refused the service account LDAP_BIND_DN")
                    return DirectoryAnswer(False, why="the service account's bind failed")
                service.search(
                    settings.ldap_user_base,
                    settings.ldap_user_filter.format(user=escape_filter_chars(name)),
                    attributes=[],
                    size_limit=2,
                )
                entries = list(service.entries)
            finally:
                service.unbind()
            if len(entries) != 1:
                return DirectoryAnswer(
                    False, why="no such user" if not entries else "ambiguous user"
                )
            user_dn = entries[0].entry_dn
        conn = _connection(settings, user_dn, password)
        try:
            if not conn.bind():
                return DirectoryAnswer(False, why="wrong password")
            groups = _groups(settings, conn, user_dn)
        finally:
            conn.unbind()
    except Exception as exc:  # the directory is down or misconfigured: say so, refuse
        log.error("directory login failed: %s: %s", exc.__class__.__name__, exc)
        return DirectoryAnswer(False, why=f"the directory failed ({exc.__class__.__name__})")
    role = role_of(settings, groups)
    if role is None:
        return DirectoryAnswer(False, why="in none of the groups that give a role here")
    return DirectoryAnswer(True, role)


def _groups(settings: Settings, conn: object, user_dn: str) -> set[str]:
    from ldap3.utils.conv import escape_filter_chars

    search_as = conn
    service = None
    if settings.ldap_bind_dn:
        service = _connection(
            settings,
            settings.ldap_bind_dn,
            settings.ldap_bind_password.get_secret_value() if settings.ldap_bind_password else None,
        )
        if service.bind():
            search_as = service
    try:
        search_as.search(  # type: ignore[attr-defined]
            settings.ldap_group_base,
            settings.ldap_group_filter.format(dn=escape_filter_chars(user_dn)),
            attributes=[],
        )
        return {_dn(entry.entry_dn) for entry in search_as.entries}  # type: ignore[attr-defined]
    finally:
        if service is not None:
            service.unbind()


def _dn(text: str) -> str:
    """A DN compared without case or spaces around its separators."""
    return ",".join(part.strip() for part in text.strip().lower().split(","))


def role_of(settings: Settings, groups: set[str]) -> Role | None:
    """The highest role any of ``groups`` (lower-case DNs) gives."""
    for role, configured in (
        (Role.ADMIN, settings.ldap_admin_groups),
        (Role.OPERATOR, settings.ldap_operator_groups),
        (Role.VIEWER, settings.ldap_viewer_groups),
    ):
        if any(_dn(group) in groups for group in configured):
            return role
    return None
