"""NOTIFY (RFC 5465): unsolicited reports about mailboxes other than the
selected one, and about the selected one outside IDLE.

Theory of operation: ``NOTIFY SET`` gives an ordered list of event groups
(filter + events); the first group whose filter matches a mailbox decides
its events (RFC 5465 §6).  The store's watch callback (called on the hub,
after each commit, with the mailbox name) hands the name to
``Notifier.on_change``, which only records it in a bounded set of pending
names and wakes the server's notifier greenlet; ``Notifier.flush`` (called
with the session lock held, between commands or while idling) turns the
pending names into responses:

* the selected mailbox: the core sync (EXISTS, FETCH FLAGS, EXPUNGE or
  VANISHED; with SELECTED-DELAYED expunges wait for a command, §5.2), plus
  a FETCH of the MessageNew attributes for new messages (§5.1);
* other mailboxes: ``* STATUS`` with MESSAGES/UIDNEXT/UIDVALIDITY for
  MessageNew/MessageExpunge, UNSEEN (and HIGHESTMODSEQ once CONDSTORE is
  on) for FlagChange (§5.1-§5.3), compared with the last status reported so
  nothing unchanged is repeated;
* MailboxName: ``* LIST`` for a created name, ``* LIST (\\NonExistent)`` for a
  deleted one, ``* LIST ... ("OLDNAME" (old))`` for a rename (§5.4);
* SubscriptionChange: ``* LIST`` with or without ``\\Subscribed`` (§5.5).

MailboxMetadataChange and ServerMetadataChange are accepted and produce
nothing until METADATA (RFC 5464) reports changes through the store.  More
than ``MAX_PENDING`` distinct pending mailboxes is an overflow: the session
sends ``* OK [NOTIFICATIONOVERFLOW]`` and stops notifying, as after NOTIFY
NONE (§5.8).  Memory per session is bounded by that cap and by the number
of the account's mailboxes (the last reported status of each).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from node.imap.protocol import FetchItem

MAX_PENDING = 1000  # distinct mailboxes waiting to be reported (RFC 5465 §5.8)
MAX_GROUPS = 64  # event groups in one NOTIFY SET
MAX_NAMES = 1024  # mailbox names in one filter

MESSAGE_EVENTS = ("MESSAGENEW", "MESSAGEEXPUNGE", "FLAGCHANGE", "ANNOTATIONCHANGE")
MAILBOX_EVENTS = ("MAILBOXNAME", "SUBSCRIPTIONCHANGE", "MAILBOXMETADATACHANGE")
USER_EVENTS = ("SERVERMETADATACHANGE",)
SUPPORTED = frozenset(
    {"MESSAGENEW", "MESSAGEEXPUNGE", "FLAGCHANGE", "MAILBOXNAME", "SUBSCRIPTIONCHANGE",
     "MAILBOXMETADATACHANGE", "SERVERMETADATACHANGE"}
)
_CANON = {
    "MESSAGENEW": "MessageNew", "MESSAGEEXPUNGE": "MessageExpunge", "FLAGCHANGE": "FlagChange",
    "ANNOTATIONCHANGE": "AnnotationChange", "MAILBOXNAME": "MailboxName",
    "SUBSCRIPTIONCHANGE": "SubscriptionChange",
    "MAILBOXMETADATACHANGE": "MailboxMetadataChange",
    "SERVERMETADATACHANGE": "ServerMetadataChange",
}
FILTERS = ("SELECTED", "SELECTED-DELAYED", "INBOXES", "PERSONAL", "SUBSCRIBED", "SUBTREE",
           "MAILBOXES")


@dataclass(frozen=True)
class EventGroup:
    """One ``(filter events)`` of NOTIFY SET."""

    filter: str  # one of FILTERS
    names: tuple[str, ...] = ()  # SUBTREE / MAILBOXES
    events: tuple[str, ...] = ()  # upper-case; () means NONE
    fetch: tuple[FetchItem, ...] = ()  # MessageNew attributes (selected filters only)

    def encode(self) -> str:
        from node.imap.protocol import encode_mailbox, encode_string

        head = self.filter
        if self.names:
            mbs = [encode_string(encode_mailbox(n)).decode("utf-8", "surrogateescape")
                   for n in self.names]
            head += " (" + " ".join(mbs) + ")"
        if not self.events:
            return f"({head} NONE)"
        evs = []
        for e in self.events:
            text = _CANON[e]
            if e == "MESSAGENEW" and self.fetch:
                text += " (" + " ".join(i.encode() for i in self.fetch) + ")"
            evs.append(text)
        return f"({head} (" + " ".join(evs) + "))"


@dataclass(frozen=True)
class NotifySpec:
    """NOTIFY SET [STATUS] groups, or NOTIFY NONE (groups None)."""

    status: bool = False
    groups: tuple[EventGroup, ...] | None = None

    def encode(self) -> bytes:
        if self.groups is None:
            return b"NONE"
        head = "SET STATUS" if self.status else "SET"
        return (head + " " + " ".join(g.encode() for g in self.groups)).encode("utf-8")


class BadEvent(Exception):
    """Events the server does not support: NO [BADEVENT (...)] (RFC 5465 §5.9)."""


# ----------------------------------------------------------------- parser


def parse_notify(r: Any) -> tuple[Any, ...]:
    """RFC 5465 §8 ``notify``.  Unsupported events parse; the handler answers
    them with BADEVENT, since that is a NO, not a BAD."""
    from node.imap.protocol import _fetch_att

    r.sp()
    word = r.atom().upper()
    if word == "NONE":
        return (NotifySpec(),)
    if word != "SET":
        raise r.fail("expected SET or NONE")
    r.sp()
    status = False
    if r.peek() != 0x28:
        if r.atom().upper() != "STATUS":
            raise r.fail("expected STATUS or an event group")
        status = True
        r.sp()
    groups: list[EventGroup] = []
    while True:
        r.expect(b"(")
        filt = r.atom().upper()
        if filt not in FILTERS:
            raise r.fail("unknown NOTIFY filter")
        names: list[str] = []
        if filt in ("SUBTREE", "MAILBOXES"):
            r.sp()
            if r.accept(b"("):
                while True:
                    names.append(r.mailbox())
                    if len(names) > MAX_NAMES:
                        raise r.fail("too many mailboxes")
                    if r.accept(b")"):
                        break
                    r.sp()
            else:
                names.append(r.mailbox())
        r.sp()
        events: list[str] = []
        fetch: list[FetchItem] = []
        if r.accept(b"("):
            while True:
                ev = r.atom().upper()
                if ev in events:
                    raise r.fail("duplicate event")
                events.append(ev)
                if ev == "MESSAGENEW" and r.peek() == 0x20 and r.line[r.pos + 1 : r.pos + 2] == b"(":
                    r.sp()
                    r.expect(b"(")
                    while True:
                        fetch.append(_fetch_att(r))
                        if len(fetch) > 64:
                            raise r.fail("too many fetch attributes")
                        if r.accept(b")"):
                            break
                        r.sp()
                if len(events) > 16:
                    raise r.fail("too many events")
                if r.accept(b")"):
                    break
                r.sp()
        elif r.atom().upper() != "NONE":
            raise r.fail("expected events or NONE")
        r.expect(b")")
        _check_group(r, filt, events, fetch)
        groups.append(EventGroup(filt, tuple(names), tuple(events), tuple(fetch)))
        if len(groups) > MAX_GROUPS:
            raise r.fail("too many event groups")
        if not r.maybe_sp():
            return (NotifySpec(status, tuple(groups)),)


def _check_group(r: Any, filt: str, events: list[str], fetch: list[FetchItem]) -> None:
    # RFC 5465 §5: MessageNew and MessageExpunge go together, FlagChange and
    # AnnotationChange need both; fetch attributes only for the selected mailbox.
    ev = set(events)
    if ("MESSAGENEW" in ev) != ("MESSAGEEXPUNGE" in ev):
        raise r.fail("MessageNew and MessageExpunge must be given together")
    if ev & {"FLAGCHANGE", "ANNOTATIONCHANGE"} and "MESSAGENEW" not in ev:
        raise r.fail("FlagChange needs MessageNew and MessageExpunge")
    if fetch and not filt.startswith("SELECTED"):
        raise r.fail("fetch attributes only for the selected mailbox")
    if filt.startswith("SELECTED") and ev & (set(MAILBOX_EVENTS) | set(USER_EVENTS)):
        raise r.fail("mailbox events not allowed for the selected mailbox")


# --------------------------------------------------------------- notifier


@dataclass
class Notifier:
    """One session's active NOTIFY SET (RFC 5465 §3)."""

    spec: NotifySpec
    pending: set[str] = field(default_factory=set)
    overflow: bool = False
    status: dict[str, tuple[int, int, int, int, int]] = field(default_factory=dict)
    known: dict[str, bool] = field(default_factory=dict)  # name -> subscribed
    last_new: int = 0  # highest UID reported with MessageNew attributes
    view_id: int = 0  # the selection last_new belongs to

    # -- matching

    def group_for(self, session: Any, name: str) -> EventGroup | None:
        """The first group whose filter matches the mailbox (RFC 5465 §6)."""
        assert self.spec.groups is not None
        selected = session.view is not None and session.view.name == name
        for g in self.spec.groups:
            f = g.filter
            if f.startswith("SELECTED"):
                if selected:
                    return g
                continue
            if f == "PERSONAL" or (f == "INBOXES" and name == "INBOX"):
                return g
            if f == "SUBSCRIBED" and self.known.get(name):
                return g
            if f == "MAILBOXES" and name in g.names:
                return g
            if f == "SUBTREE" and any(name == n or name.startswith(n + "/") for n in g.names):
                return g
        return None

    # -- hub side (no I/O)

    def on_change(self, session: Any, name: str) -> bool:
        """Record a change; True if the server should wake the session."""
        if self.overflow:
            return True
        if name not in self.pending and len(self.pending) >= MAX_PENDING:
            self.overflow = True
            self.pending.clear()
            return True
        self.pending.add(name)
        return True

    # -- session side (lock held)

    def snapshot(self, session: Any) -> None:
        """Remember names, subscriptions and statuses (NOTIFY SET time)."""
        store, acct = session.ctx.store, session._acct
        self.known = {m.name: m.subscribed for m in store.list_mailboxes(acct)}
        if session.view is not None:
            self.view_id = id(session.view)
            self.last_new = session.view.uids[-1] if session.view.uids else 0
        for name in self.known:
            g = self.group_for(session, name)
            if g is None or g.filter.startswith("SELECTED") or not _message_events(g):
                continue
            try:
                st = store.status(acct, name)
            except Exception:  # noqa: BLE001 - a racing delete: nothing to report
                continue
            self.status[name] = _key(st)
            if self.spec.status:  # RFC 5465 §5.1: NOTIFY SET STATUS
                session._write(_status_line(session, name, g, st, initial=True))

    def flush(self, session: Any) -> None:
        """Report what is pending (RFC 5465 §5)."""
        from node.imap.protocol import status_untagged

        if self.overflow:
            session._write(status_untagged("OK", "too many events, NOTIFY is off",
                                           "NOTIFICATIONOVERFLOW"))
            session.notify = None  # RFC 5465 §5.8: as after NOTIFY NONE
            return
        names, self.pending = sorted(self.pending), set()
        store, acct = session.ctx.store, session._acct
        listed = {m.name: m for m in store.list_mailboxes(acct)}
        gone = [n for n in names if n in self.known and n not in listed]
        born = [n for n in names if n not in self.known and n in listed]
        self._report_names(session, gone, born, listed)
        for name in names:
            if name not in listed:
                continue
            g = self.group_for(session, name)
            info = listed[name]
            if g is not None and "SUBSCRIPTIONCHANGE" in g.events and name not in born \
                    and self.known.get(name) != info.subscribed:
                session._write(_list_line(name, subscribed=info.subscribed))
            self.known[name] = info.subscribed
            if g is None or not g.events:
                continue
            if g.filter.startswith("SELECTED"):
                self._selected(session, g)
            elif _message_events(g):
                st = store.status(acct, name)
                before = self.status.get(name)
                self.status[name] = _key(st)
                if before != _key(st) and name not in born:  # LIST told of a new one
                    session._write(_status_line(session, name, g, st, before=before))

    def _report_names(self, session: Any, gone: list[str], born: list[str],
                      listed: dict[str, Any]) -> None:
        # A rename commits as one op and reports both names (storage
        # watch): one gone and one new name in the same flush is a rename.
        wants = [n for n in gone + born if self._wants_names(session, n)]
        if len(gone) == 1 and len(born) == 1 and wants:
            session._write(_list_line(born[0], subscribed=listed[born[0]].subscribed,
                                      oldname=gone[0]))
        else:
            for n in gone:
                if n in wants:
                    session._write(_list_line(n, nonexistent=True))
            for n in born:
                if n in wants:
                    session._write(_list_line(n, subscribed=listed[n].subscribed))
        for n in gone:
            self.known.pop(n, None)
            self.status.pop(n, None)
        for n in born:
            self.known[n] = listed[n].subscribed

    def _wants_names(self, session: Any, name: str) -> bool:
        g = self.group_for(session, name)
        return g is not None and "MAILBOXNAME" in g.events

    def _selected(self, session: Any, g: EventGroup) -> None:
        """The selected mailbox: the core sync, then MessageNew attributes."""
        view = session.view
        if not {"MESSAGENEW", "FLAGCHANGE"} & set(g.events):
            return
        if id(view) != self.view_id:  # a new selection: SELECT reported what is there
            self.view_id = id(view)
            self.last_new = view.uids[-1] if view.uids else 0
        session._dirty = True
        session._sync_safe(expunge=g.filter == "SELECTED")
        view = session.view
        if view is None or not g.fetch:
            return
        fresh = [u for u in view.uids if u > self.last_new and u not in view.gone]
        if fresh:
            from node.imap.protocol import Command, SeqSet

            self.last_new = fresh[-1]
            cmd = Command("*", "FETCH", (SeqSet(((fresh[0], fresh[-1]),)), g.fetch), uid=True)
            session._cmd_fetch(cmd)


def _message_events(g: EventGroup) -> bool:
    return bool({"MESSAGENEW", "MESSAGEEXPUNGE", "FLAGCHANGE"} & set(g.events))


def _key(st: Any) -> tuple[int, int, int, int, int]:
    return (st.messages, st.uidnext, st.uidvalidity, st.unseen, st.highestmodseq)


def _status_line(session: Any, name: str, g: EventGroup, st: Any, *, initial: bool = False,
                 before: tuple[int, int, int, int, int] | None = None) -> bytes:
    """``* STATUS`` for a non-selected mailbox (RFC 5465 §5.1-§5.3)."""
    from node.imap.protocol import Atom, untagged

    items: list[Any] = []
    moved = before is None or before[:3] != _key(st)[:3]
    if initial or moved:
        items += [Atom("MESSAGES"), st.messages, Atom("UIDNEXT"), st.uidnext,
                  Atom("UIDVALIDITY"), st.uidvalidity]
    if "FLAGCHANGE" in g.events or initial:
        items += [Atom("UNSEEN"), st.unseen]
        if session.enabled & {"CONDSTORE", "QRESYNC"}:
            items += [Atom("HIGHESTMODSEQ"), st.highestmodseq]
    if not items:  # a flag change nobody asked for: still tell the counts
        items += [Atom("MESSAGES"), st.messages]
    from node.imap.session import _mbox  # UTF-8 after IMAP4rev2 (RFC 9051 §5.1)

    return untagged("STATUS", _mbox(name), items)


def _list_line(name: str, *, subscribed: bool = False, nonexistent: bool = False,
               oldname: str | None = None) -> bytes:
    """``* LIST`` for MailboxName / SubscriptionChange (RFC 5465 §5.4, §5.5)."""
    from node.imap.session import _mbox  # UTF-8 after IMAP4rev2 (RFC 9051 §5.1)

    attrs = ["\\NonExistent"] if nonexistent else []
    if subscribed:
        attrs.append("\\Subscribed")
    mb = _mbox(name).data
    line = b"* LIST (" + " ".join(attrs).encode("ascii") + b') "/" ' + mb
    if oldname is not None:  # RFC 5258 §6 / RFC 5465 §5.4
        line += b' ("OLDNAME" (' + _mbox(oldname).data + b"))"
    return line + b"\r\n"
