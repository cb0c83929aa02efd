"""Differential test: postroom's MIME views against Dovecot's, whole golden corpus.

A private Dovecot (tests/support/dovecot.py) and a postroom node each get
every tests/corpus/*.eml by APPEND; then both answer, per message, FETCH
ENVELOPE, BODYSTRUCTURE, BODY, RFC822.SIZE (RFC 3501 §7.4.2), and
BODY.PEEK[n.MIME], BODY.PEEK[n] for every part n, BODY.PEEK[n.HEADER] and
BODY.PEEK[n.TEXT] for every message/rfc822 part and
BODY.PEEK[HEADER.FIELDS (...)] (RFC 3501 §6.4.5).

Normalizations (only what RFC 3501 leaves open, each in ``normalize``):

- N1 atom, quoted string and literal of the same octets are the same string
  (RFC 3501 §4.3: the choice of form is the server's);
- N2 body type, subtype, parameter names and disposition types compare
  case-insensitively, and so do charset values (RFC 2045 §5.1, RFC 2046
  §4.1.2: they are case-insensitive; both servers pass through the case the
  message used, except that Dovecot's BODY sometimes lower-cases it).

Every remaining difference is either a postroom bug or listed in DIVERGENCES
with its reason; docs/mime.md ("Divergences from Dovecot") explains each
(D1-D10).  test_divergences_are_still_real keeps the list from going stale.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import dovecot
from tests.support.imapwire import Wire, parse_fetch
from tests.support.node import NodeProcess

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not dovecot.available(), reason="dovecot-imapd not installed"),
]

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
CASES = sorted(p.stem for p in CORPUS.glob("*.eml"))
MIN_CASES = 50
USER = ("diff@example.test", "diff-pw-12345")
HEADER_FIELDS = b"(From To Cc Subject Date Message-ID Content-Type X-Missing)"

# Documented divergences (docs/mime.md, "Divergences from Dovecot"): case ->
# (items, reason).  "*" allows every item of the case.
_LF = "stored with bare LF and measured as stored; Dovecot counts and sends CRLF (D1)"
_8BIT = "invalid UTF-8 in a header is sent as U+FFFD; Dovecot sends raw 8-bit octets (D2)"
_UNFOLD = "RFC 5322 §2.2.3 unfolding removes only CRLF; Dovecot also rewrites the WSP (D3)"
_EPILOGUE = ("RFC 2046 §5.1.1: the CRLF before an outer delimiter belongs to it, so an "
             "inner close delimiter's line break is not in the inner part; Dovecot keeps it (D8)")
_DEEP = tuple(".".join(["1"] * k) for k in range(1, 12))
DIVERGENCES: dict[str, tuple[tuple[str, ...], str]] = {
    "07-no-boundary-parameter": (
        ("BODYSTRUCTURE", "BODY", "1", "1.MIME"),
        "a multipart without boundary is shown as text/plain so its text stays readable; "
        "Dovecot shows an empty multipart (D4)"),
    "10-invalid-8bit-lf": (("*",), _LF + "; " + _8BIT),
    "14-lf-only-multipart": (("*",), _LF),
    "27-line-endings-lf": (("*",), _LF),
    "58-nested-rfc822-in-digest-lf": (("*",), _LF),
    "17-long-header-lines": (("ENVELOPE",), _UNFOLD),
    "61-crlf-in-quoted-and-folded-subject": (("ENVELOPE",), _UNFOLD),
    "18-duplicate-headers": (
        ("ENVELOPE",),
        "a repeated Subject/From: the first occurrence wins; Dovecot takes the last Subject "
        "and joins the address lists (D5)"),
    "23-null-sender-and-bare-local": (
        ("ENVELOPE",), "From: <> is (NIL NIL \"\" \"\"); Dovecot says MISSING_MAILBOX (D6)"),
    "51-address-edge-cases": (
        ("ENVELOPE",),
        "a quoted local part keeps its quotes so mailbox@host is a valid address; and "
        "<> as in 23 (D6)"),
    "24-padding-invalid-type-encoding": (
        ("BODYSTRUCTURE", "BODY"),
        "an unusable Content-Type is text/plain (RFC 2045 §5.2); Dovecot keeps an empty "
        "subtype (D7)"),
    "56-type-without-subtype": (
        ("BODYSTRUCTURE", "BODY"),
        "as 24, and a nameless `=value` parameter is dropped; Dovecot sends \"\" (D7)"),
    "32-calendar-invite": (("1",), _EPILOGUE),
    "62-k9-mail-alternative-attachment": (("1",), _EPILOGUE),
    "38-deep-nesting-12": (_DEEP, _EPILOGUE),
    "44-8bit-latin1-headers": (("ENVELOPE",), _8BIT),
    "46-rfc2231-language-unordered": (
        ("BODYSTRUCTURE", "BODY"),
        "a plain section joined to RFC 2231 extended ones is %-encoded so the value stays "
        "decodable; Dovecot appends it raw (D9)"),
    "63-boundary-prefix-of-inner": (
        ("*",),
        "the outer boundary is a prefix of the inner one, which RFC 2046 §5.1.1 forbids; we "
        "apply the rule literally, Dovecot tries the inner boundary first (D10)"),
}
ALLOWED: dict[tuple[str, str], str] = {
    (case, item): reason for case, (items, reason) in DIVERGENCES.items() for item in items
}


def _allowed(case: str, item: str) -> bool:
    return (case, item) in ALLOWED or (case, "*") in ALLOWED


def _lower_body(value):
    """N2: lower-case type, subtype, parameter names and disposition types."""
    if not isinstance(value, list) or not value:
        return value
    if isinstance(value[0], list):  # multipart: parts..., subtype, [ext...]
        i = 0
        out = []
        while i < len(value) and isinstance(value[i], list):
            out.append(_lower_body(value[i]))
            i += 1
        rest = list(value[i:])
        if rest:
            rest[0] = _lower(rest[0])
        if len(rest) > 1:
            rest[1] = _params(rest[1])
        if len(rest) > 2:
            rest[2] = _disposition(rest[2])
        return out + rest
    out = list(value)
    out[0] = _lower(out[0])
    out[1] = _lower(out[1])
    out[2] = _params(out[2])
    is_message = out[0] == b"message" and out[1] in (b"rfc822", b"global")
    if is_message and len(out) > 8:
        out[8] = _lower_body(out[8])
        ext = 10
    elif out[0] == b"text":
        ext = 8
    else:
        ext = 7
    if len(out) > ext + 1:
        out[ext + 1] = _disposition(out[ext + 1])
    return out


def _lower(v):
    return v.lower() if isinstance(v, bytes) else v


def _params(v):
    if not isinstance(v, list):
        return v
    out = [_lower(x) if i % 2 == 0 else x for i, x in enumerate(v)]
    for i in range(0, len(out) - 1, 2):
        if out[i] == b"charset":  # RFC 2046 §4.1.2: charset names are case-insensitive
            out[i + 1] = _lower(out[i + 1])
    return out


def _disposition(v):
    if not isinstance(v, list) or not v:
        return v
    return [_lower(v[0]), _params(v[1]) if len(v) > 1 else None]


def _strings(value):
    """N1: atoms become bytes like quoted strings and literals (NIL stays None)."""
    if isinstance(value, list):
        return [_strings(v) for v in value]
    if isinstance(value, str):
        return value.encode("latin-1")
    return value


def normalize(item: str, value):
    value = _strings(value)
    if item in ("BODY", "BODYSTRUCTURE"):
        value = _lower_body(value)
    return value


def _part_paths(body, prefix: str = "") -> Iterator[str]:
    """Every part number RFC 3501 §6.4.5 assigns, from a parsed BODYSTRUCTURE."""
    if isinstance(body[0], list):
        children = list(itertools.takewhile(lambda c: isinstance(c, list), body))
        for n, child in enumerate(children, start=1):
            path = f"{prefix}{n}"
            yield path
            yield from _part_paths_inner(child, path)
    else:
        yield f"{prefix}1"
        yield from _part_paths_inner(body, f"{prefix}1")


def _part_paths_inner(body, path: str) -> Iterator[str]:
    if isinstance(body[0], list):
        yield from _part_paths(body, path + ".")
    elif _strings(body[0]).lower() == b"message" and _strings(body[1]).lower() == b"rfc822":
        inner = body[8]
        if isinstance(inner, list):
            if isinstance(inner[0], list):
                yield from _part_paths(inner, path + ".")
            else:
                yield f"{path}.1"


def _message_paths(body, prefix: str = "") -> Iterator[str]:
    """Part numbers of the message/rfc822 parts, whose HEADER and TEXT are fetchable.

    ``body`` is the body of a message whose parts are numbered ``prefix`` + n.
    """
    if isinstance(body[0], list):
        children = list(itertools.takewhile(lambda c: isinstance(c, list), body))
        for n, child in enumerate(children, start=1):
            yield from _message_parts_of(child, f"{prefix}{n}")
    else:
        yield from _message_parts_of(body, f"{prefix}1")


def _message_parts_of(part, path: str) -> Iterator[str]:
    if isinstance(part[0], list):
        yield from _message_paths(part, path + ".")
    elif _strings(part[0]).lower() == b"message" and _strings(part[1]).lower() == b"rfc822":
        yield path
        if isinstance(part[8], list):
            yield from _message_paths(part[8], path + ".")


class Server:
    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        self.wire = Wire(host, port)
        tagged, _ = self.wire.command(f'LOGIN "{USER[0]}" "{USER[1]}"'.encode())
        assert b" OK " in tagged, (name, tagged)

    def append(self, raw: bytes) -> None:
        tagged, _ = self.wire.command(b"APPEND INBOX {%d}\r\n" % len(raw) + raw)
        assert b" OK " in tagged, (self.name, tagged)

    def select(self) -> None:
        tagged, _ = self.wire.command(b"SELECT INBOX")
        assert b" OK " in tagged, (self.name, tagged)

    def fetch(self, seq: int, items: bytes) -> dict[str, object]:
        tagged, untagged = self.wire.command(b"FETCH %d %s" % (seq, items))
        assert b" OK " in tagged, (self.name, items, tagged)
        out: dict[str, object] = {}
        for line in untagged:
            if b" FETCH " in line[:20]:
                n, got = parse_fetch(line)
                if n == seq:
                    out.update(got)
        return out


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Server, Server]]:
    with tempfile.TemporaryDirectory(prefix="postroom-diff-") as tmp:
        os.chmod(tmp, 0o755)  # Dovecot's unprivileged processes must traverse it
        (Path(tmp) / "dovecot").mkdir()
        dc = dovecot.DovecotServer(Path(tmp) / "dovecot", {USER[0]: USER[1]})
        node = NodeProcess(Path(tmp) / "node")
        try:
            dc.start()
            node.start()
            node.provision(USER)
            a = Server("postroom", node.host, node.ports["imap"])
            b = Server("dovecot", dc.host, dc.port)
            for name in CASES:
                raw = (CORPUS / f"{name}.eml").read_bytes()
                a.append(raw)
                b.append(raw)
            a.select()
            b.select()
            yield a, b
            a.wire.close()
            b.wire.close()
        finally:
            node.stop()
            dc.stop()


def _item(got: dict[str, object], key: str):
    """The value of ``key``; section names compare case-insensitively (RFC 3501 §9)."""
    for name, value in got.items():
        if name.upper() == key.upper():
            return value
    return None


COMPARED: list[tuple[str, str]] = []  # (case, item) of every comparison made


def compare_case(seq: int, name: str, ours: Server, theirs: Server) -> list[tuple[str, str]]:
    """Every difference for one message: (item, readable text)."""
    diffs: list[tuple[str, str]] = []

    def check(item: str, key: str, fetch_items: bytes) -> None:
        COMPARED.append((name, item))
        a = _item(ours.fetch(seq, fetch_items), key)
        b = _item(theirs.fetch(seq, fetch_items), key)
        if normalize(key, a) != normalize(key, b):
            diffs.append((item, f"{name} {item}:\n  postroom: {a!r}\n  dovecot:  {b!r}"))

    check("ENVELOPE", "ENVELOPE", b"(ENVELOPE)")
    check("BODYSTRUCTURE", "BODYSTRUCTURE", b"(BODYSTRUCTURE)")
    check("BODY", "BODY", b"(BODY)")
    check("RFC822.SIZE", "RFC822.SIZE", b"(RFC822.SIZE)")
    check("HEADER.FIELDS", "BODY[HEADER.FIELDS " + HEADER_FIELDS.decode() + "]",
          b"(BODY.PEEK[HEADER.FIELDS " + HEADER_FIELDS + b"])")
    structure = theirs.fetch(seq, b"(BODYSTRUCTURE)")["BODYSTRUCTURE"]
    for path in _part_paths(structure):
        check(f"{path}.MIME", f"BODY[{path}.MIME]", f"(BODY.PEEK[{path}.MIME])".encode())
        check(path, f"BODY[{path}]", f"(BODY.PEEK[{path}])".encode())
    for path in _message_paths(structure):
        for spec in ("HEADER", "TEXT"):
            item = f"{path}.{spec}"
            check(item, f"BODY[{item}]", f"(BODY.PEEK[{item}])".encode())
    return diffs


@pytest.fixture(scope="module")
def differences(servers) -> dict[str, list[tuple[str, str]]]:
    ours, theirs = servers
    return {name: compare_case(seq, name, ours, theirs) for seq, name in enumerate(CASES, 1)}


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= MIN_CASES


def test_allow_list_names_real_cases() -> None:
    for case in DIVERGENCES:
        assert case in CASES, case


def test_every_case_matches_dovecot(differences) -> None:
    # RFC 3501 §7.4.2 (ENVELOPE, BODY, BODYSTRUCTURE, RFC822.SIZE), §6.4.5 (sections)
    assert len(differences) >= MIN_CASES
    # The comparison reached deep sections, not just the top-level items.
    assert ("42-rfc822-in-rfc822", "1.1.TEXT") in COMPARED
    assert ("38-deep-nesting-12", ".".join(["1"] * 12) + ".MIME") in COMPARED
    assert len(COMPARED) > 8 * len(CASES)
    unexplained = [
        text for name, diffs in differences.items() for item, text in diffs
        if not _allowed(name, item)
    ]
    assert not unexplained, "\n".join(unexplained)


def test_divergences_are_still_real(differences) -> None:
    # An allow-list entry that no longer differs hides nothing but misleads the reader.
    stale = []
    for case, (items, _reason) in DIVERGENCES.items():
        differing = {item for item, _ in differences[case]}
        if items == ("*",):
            if not differing:
                stale.append((case, "*"))
        else:
            stale += [(case, item) for item in items if item not in differing]
    assert not stale, stale
