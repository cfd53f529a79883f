"""Roles, local accounts and service-account API tokens (the database side of who is who).

- **Roles** are ranked: ``viewer`` < ``operator`` < ``admin``; a route asks for the least
  role it needs and every higher role passes.
- **Local accounts** (sites without a directory): the password is kept only as a scrypt hash
  (``hashlib.scrypt``, N=2^14, r=8, p=1, a 16-byte random salt); it is never stored, printed
  or logged in clear.
- **API tokens** of service accounts: ``cxr_`` and 43 random URL-safe characters (256 bits).
  Only their SHA-256 is kept (a token that long needs no slow hash), so a token is shown once,
  at creation. Each has a role, an optional expiry, its last use, and can be revoked.

The functions take a SQLAlchemy session and commit nothing themselves where the caller
batches; the CLI (:mod:`cxrnode.cli.accounts`) and the web app use them alike.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxrnode.db import ApiToken, LocalUser, utcnow

TOKEN_PREFIX = "cxr_"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
#: A token's last use is written at most this often (an API client polling every second
#: must not turn each read into a database write).
LAST_USE_RESOLUTION = timedelta(seconds=60)


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def allows(self, needed: Role) -> bool:
        """Whether this role may do what ``needed`` may."""
        return self.rank >= needed.rank

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise ValueError(
                f"role {text!r} is unknown; expected one of {', '.join(r.value for r in cls)}"
            ) from None


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(
            f"name {name!r}: expected 1-64 letters, digits or . _ @ - (starting with a letter "
            "or digit)"
        )
    return name


# ------------------------------------------------------------------------------ passwords


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64): the only form a password is kept in."""
    if len(password) < 8:
        raise ValueError("a password needs 8 or more characters")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    b64 = base64.b64encode
    return "scrypt${n}${r}${p}$".format(**_SCRYPT) + f"{b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        found = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=32,
        )
    except ValueError:
        return False
    return hmac.compare_digest(found, base64.b64decode(digest))


#: Compared against when the name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = hash_password("not a password of anyone")


def add_user(session: Session, name: str, role: Role, password: str) -> LocalUser:
    check_name(name)
    if session.scalar(select(LocalUser).where(LocalUser.name == name)) is not None:
        raise ValueError(f"a user named {name!r} exists; remove it first or choose another name")
    user = LocalUser(name=name, role=role.value, password_hash=hash_password(password))
    session.add(user)
    return user


def authenticate_local(session: Session, name: str, password: str) -> Role | None:
    """The role of the local account ``name`` when ``password`` is right (None otherwise)."""
    user = session.scalar(
        select(LocalUser).where(LocalUser.name == name, LocalUser.disabled_at.is_(None))
    )
    if user is None:
        verify_password(password, _DUMMY_HASH)
        return None
    return Role(user.role) if verify_password(password, user.password_hash) else None


def remove_user(session: Session, name: str) -> bool:
    user = session.scalar(select(LocalUser).where(LocalUser.name == name))
    if user is None:
        return False
    session.delete(user)
    return True


# ------------------------------------------------------------------------------ tokens


def token_digest(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


def parse_duration(text: str) -> timedelta:
    """``90d``, ``12h``, ``30m`` or ``2w``."""
    match = re.fullmatch(r"\s*(\d+)\s*([mhdw])\s*", text.lower())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"duration {text!r}: expected a number and m, h, d or w, e.g. 90d")
    unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[match.group(2)]
    return timedelta(**{unit: int(match.group(1))})


@dataclass(frozen=True)
class NewToken:
    name: str
    role: Role
    expires_at: datetime | None
    token: str  # shown once


def create_token(
    session: Session, name: str, role: Role, expires: timedelta | None = None
) -> NewToken:
    check_name(name)
    if session.scalar(select(ApiToken).where(ApiToken.name == name)) is not None:
        raise ValueError(f"a token named {name!r} exists; revoke it or choose another name")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires_at = utcnow() + expires if expires else None
    session.add(
        ApiToken(name=name, role=role.value, token_hash=token_digest(token), expires_at=expires_at)
    )
    return NewToken(name, role, expires_at, token)


@dataclass(frozen=True)
class TokenHolder:
    name: str
    role: Role


def token_holder(session: Session, token: str, now: datetime | None = None) -> TokenHolder | None:
    """Who holds ``token`` (None: unknown, revoked or expired); records its last use."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == token_digest(token)))
    now = now or utcnow()
    if row is None or row.revoked_at is not None:
        return None
    if row.expires_at is not None and row.expires_at <= now:
        return None
    if row.last_used_at is None or now - row.last_used_at >= LAST_USE_RESOLUTION:
        row.last_used_at = now
        session.commit()
    return TokenHolder(row.name, Role(row.role))


def revoke_token(session: Session, name: str) -> bool:
    row = session.scalar(
        select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None))
    )
    if row is None:
        return False
    row.revoked_at = utcnow()
    return True


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.name)))


def list_users(session: Session) -> list[LocalUser]:
    return list(session.scalars(select(LocalUser).order_by(LocalUser.name)))


def any_accounts(session: Session) -> bool:
    """Whether a local account or a live token exists (then the web app asks who is there)."""
    return (
        session.scalar(select(LocalUser.id).limit(1)) is not None
        or session.scalar(select(ApiToken.id).where(ApiToken.revoked_at.is_(None)).limit(1))
        is not None
    )
