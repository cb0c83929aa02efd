"""QUOTA (RFC 9208): GETQUOTAROOT, GETQUOTA, SETQUOTA and OVERQUOTA checks.

Each account has one quota root, ``""``, covering all its mailboxes, with
the resource STORAGE (RFC 9208 §5.1, units of 1024 octets): the limit is the
account's ``quota_bytes`` in the directory (``postroom user quota``), the
usage the shard's per-account counter.  An account without a limit has no
quota root (``* QUOTAROOT mailbox`` names none, GETQUOTA "" is NO).  Users
cannot change limits: SETQUOTA is parsed and refused with ``NO [NOPERM]``
(RFC 9208 §4.1.3; QUOTASET is not advertised).

APPEND and COPY that would take the account past its limit fail with
``NO [OVERQUOTA]`` (RFC 9208 §4.3, §7; checked in session.py, SMTP in
node/mailflow/quota.py); MOVE within an account does not
change its usage, so it is allowed even when the account is full (a user
over quota must still be able to move mail to Trash and expunge it).
"""

from __future__ import annotations

from typing import Any

from node.imap.protocol import Atom, Command, State, encode_string, register_command, untagged
from node.imap.session import Reply, _mbox, no, ok

_AUTHED = frozenset({State.AUTHENTICATED, State.SELECTED})

ROOT = ""  # the one quota root of every account
KIB = 1024  # RFC 9208 §5.1: STORAGE is counted in units of 1024 octets
MAX_SETQUOTA_RESOURCES = 32


def _kib(octets: int) -> int:
    return (octets + KIB - 1) // KIB


# --------------------------------------------------------------------- parsers


def _parse_mailbox(r: Any) -> tuple[Any, ...]:
    r.sp()
    return (r.mailbox(),)


def _parse_root(r: Any) -> tuple[Any, ...]:
    r.sp()
    return (r.text_str(r.astring()),)


def _parse_setquota(r: Any) -> tuple[Any, ...]:
    """RFC 9208 §4.1.3: SETQUOTA root (resource limit ...)."""
    r.sp()
    root = r.text_str(r.astring())
    r.sp()
    r.expect(b"(")
    limits: list[tuple[str, int]] = []
    while not r.accept(b")"):
        if limits:
            r.sp()
        name = r.atom().upper()
        r.sp()
        value = r._take(lambda c: 0x30 <= c <= 0x39)
        if not value or len(value) > 19:
            raise r.fail("expected a 63-bit number")
        limits.append((name, int(value)))
        if len(limits) > MAX_SETQUOTA_RESOURCES:
            raise r.fail("too many quota resources")
    return (root, tuple(limits))


# --------------------------------------------------------------------- handlers


def _quota_line(session: Any, limit: int) -> bytes:
    used, _messages = session.ctx.store.usage(session._acct)
    return untagged("QUOTA", Atom(encode_string(ROOT).decode()),
                    [Atom("STORAGE"), _kib(used), limit // KIB])


def cmd_getquotaroot(session: Any, cmd: Command) -> Reply:
    """RFC 9208 §4.1.2."""
    name = cmd.args[0]
    session.ctx.store.status(session._acct, name)  # NO [NONEXISTENT] if missing
    limit = session.ctx.directory.quota(session._acct)
    if limit is None:
        session._write(untagged("QUOTAROOT", _mbox(name)))
    else:
        session._write(untagged("QUOTAROOT", _mbox(name), Atom(encode_string(ROOT).decode())))
        session._write(_quota_line(session, limit))
    return ok("GETQUOTAROOT completed")


def cmd_getquota(session: Any, cmd: Command) -> Reply:
    """RFC 9208 §4.1.1."""
    limit = session.ctx.directory.quota(session._acct)
    if cmd.args[0] != ROOT or limit is None:
        return no("no such quota root", "NONEXISTENT")
    session._write(_quota_line(session, limit))
    return ok("GETQUOTA completed")


def cmd_setquota(session: Any, cmd: Command) -> Reply:
    """RFC 9208 §4.1.3: limits are the administrator's (postroom user quota)."""
    return no("quota limits are set by the administrator", "NOPERM")


register_command("GETQUOTAROOT", _parse_mailbox, _AUTHED)
register_command("GETQUOTA", _parse_root, _AUTHED)
register_command("SETQUOTA", _parse_setquota, _AUTHED)

HANDLERS = {
    "GETQUOTAROOT": cmd_getquotaroot,
    "GETQUOTA": cmd_getquota,
    "SETQUOTA": cmd_setquota,
}
