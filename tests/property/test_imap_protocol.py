"""Property tests of the IMAP core (style: parse→encode→parse is a fixed
point; every (state, input) gives a valid response or BAD, never an
exception)."""

from __future__ import annotations

import datetime
import importlib
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.imap.protocol import (
    MACROS,
    NEED_DATA,
    SIMPLE_FETCH,
    STAR,
    STATUS_ITEMS,
    Command,
    FetchItem,
    FramedCommand,
    Framer,
    Limits,
    ParseError,
    Secret,
    Section,
    SeqSet,
    encode_command,
    parse_command,
)
from node.imap.search import (
    DATE_KEYS,
    FLAG_ARG_KEYS,
    NUMBER_KEYS,
    PLAIN_KEYS,
    STRING_KEYS,
    SearchKey,
)
from tests.unit.imap.helpers import Client

# Extension families import once node.imap.session has (the helpers import it).
ListOptions = importlib.import_module("node.imap.commands.listext").ListOptions

LIMITS = Limits()

atoms = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-_.$", min_size=1,
                max_size=12)
texts = st.text(max_size=20).filter(lambda s: "\x00" not in s)
names = st.one_of(
    st.just("INBOX"),
    st.text(min_size=1, max_size=15).filter(lambda s: s.upper() != "INBOX" and "\x00" not in s),
)
numbers = st.integers(min_value=1, max_value=2**32 - 1)
seq_numbers = st.one_of(numbers, st.just(STAR))
seqsets = st.lists(st.tuples(seq_numbers, seq_numbers), min_size=1, max_size=5).map(
    lambda r: SeqSet(tuple(r)))
keywords = atoms.filter(lambda a: a.upper() != "NIL")
flags = st.lists(st.one_of(st.sampled_from(["\\Seen", "\\Answered", "\\Flagged", "\\Deleted",
                                            "\\Draft"]), keywords), max_size=4).map(tuple)
dates = st.dates(min_value=datetime.date(1900, 1, 1), max_value=datetime.date(2999, 12, 31))
field_names = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789", min_size=1, max_size=12)
sections = st.one_of(
    st.builds(Section, st.just(()), st.sampled_from([None, "HEADER", "TEXT"])),
    st.builds(Section, st.lists(st.integers(1, 50), min_size=1, max_size=3).map(tuple),
              st.sampled_from([None, "HEADER", "TEXT", "MIME"])),
    st.builds(Section, st.lists(st.integers(1, 9), max_size=2).map(tuple),
              st.sampled_from(["HEADER.FIELDS", "HEADER.FIELDS.NOT"]),
              st.lists(field_names, min_size=1, max_size=3).map(tuple)),
)
fetch_items = st.one_of(
    st.sampled_from(sorted(SIMPLE_FETCH)).map(FetchItem),
    st.builds(lambda s, p, part: FetchItem("BODY[]", s, p, part), sections, st.booleans(),
              st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.integers(1, 10**6)))),
)


def search_keys(depth: int = 0) -> st.SearchStrategy[SearchKey]:
    leaves = st.one_of(
        st.sampled_from(sorted(PLAIN_KEYS)).map(SearchKey),
        st.builds(lambda k, v: SearchKey(k, (v,)), st.sampled_from(sorted(STRING_KEYS)), texts),
        st.builds(lambda f, v: SearchKey("HEADER", (f, v)), field_names, texts),
        st.builds(lambda k, v: SearchKey(k, (v,)), st.sampled_from(sorted(DATE_KEYS)), dates),
        st.builds(lambda k, v: SearchKey(k, (v,)), st.sampled_from(sorted(NUMBER_KEYS)),
                  st.integers(0, 2**32 - 1)),
        st.builds(lambda k, v: SearchKey(k, (v,)), st.sampled_from(sorted(FLAG_ARG_KEYS)),
                  keywords),
        st.builds(lambda s: SearchKey("UID", (s,)), seqsets),
        st.builds(lambda s: SearchKey("SEQ", (s,)), seqsets),
    )
    if depth >= 3:
        return leaves
    sub = st.deferred(lambda: search_keys(depth + 1))
    return st.one_of(
        leaves,
        sub.map(lambda k: SearchKey("NOT", (k,))),
        st.tuples(sub, sub).map(lambda ab: SearchKey("OR", ab)),
        st.lists(sub, min_size=2, max_size=3).map(lambda ks: SearchKey("AND", tuple(ks))),
    )


tags = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.", min_size=1, max_size=8)
date_times = st.datetimes(min_value=datetime.datetime(1970, 1, 2),
                          max_value=datetime.datetime(2999, 1, 1)).map(
    lambda d: d.replace(microsecond=0, tzinfo=datetime.timezone(datetime.timedelta(hours=-8))))


def _cmd(name: str, args_strategy, uid: bool = False):
    return st.builds(lambda t, a: Command(t, name, a, uid), tags, args_strategy)


commands = st.one_of(
    *[_cmd(n, st.just(())) for n in ("CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "CHECK",
                                       "CLOSE", "EXPUNGE", "IDLE")],
    _cmd("LOGIN", st.tuples(texts.filter(bool), st.binary(max_size=20).filter(
        lambda b: b"\x00" not in b).map(Secret))),
    _cmd("AUTHENTICATE", st.tuples(st.just("PLAIN"), st.one_of(st.none(), st.just("=")))),
    *[_cmd(n, st.tuples(names)) for n in ("SELECT", "EXAMINE", "CREATE", "DELETE",
                                            "SUBSCRIBE", "UNSUBSCRIBE")],
    _cmd("RENAME", st.tuples(names, names)),
    _cmd("LIST", st.tuples(texts.filter(lambda s: "\r" not in s), st.text(max_size=10))),
    _cmd("STATUS", st.tuples(names, st.lists(st.sampled_from(STATUS_ITEMS), min_size=1,
                                             max_size=5).map(tuple))),
    _cmd("APPEND", st.tuples(names, flags, st.one_of(st.none(), date_times),
                             st.binary(max_size=50))),
    _cmd("SEARCH", st.tuples(st.sampled_from([None, "UTF-8"]), search_keys())),
    _cmd("FETCH", st.tuples(seqsets, st.lists(fetch_items, min_size=1, max_size=4).map(tuple))),
    _cmd("STORE", st.tuples(seqsets, st.sampled_from(["set", "add", "remove"]), st.booleans(),
                            flags)),
    _cmd("COPY", st.tuples(seqsets, names)),
    st.builds(lambda t, s: Command(t, "EXPUNGE", (s,), True), tags, seqsets),
    st.builds(lambda t, a: Command(t, "FETCH", a, True), tags,
              st.tuples(seqsets, st.lists(fetch_items, min_size=1, max_size=3).map(tuple))),
)

# Extension commands (node/imap/commands/*, encoded by commands/encode.py).
id_fields = st.text(max_size=30).filter(lambda s: "\x00" not in s and len(s.encode()) <= 30)
special_uses = st.sampled_from(["\\Archive", "\\Drafts", "\\Junk", "\\Sent", "\\Trash",
                                "\\All", "\\Flagged"])
entries = st.builds(lambda scope, parts: f"/{scope}/" + "/".join(parts),
                    st.sampled_from(["private", "shared"]),
                    st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._",
                                     min_size=1, max_size=8), min_size=1, max_size=3))
list_options = st.builds(
    ListOptions,
    select=st.lists(st.sampled_from(["SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"]),
                    unique=True).filter(lambda s: "RECURSIVEMATCH" not in s or bool(
                        set(s) - {"RECURSIVEMATCH", "REMOTE"})).map(tuple),
    patterns=st.lists(st.text(max_size=10).filter(lambda s: "\x00" not in s), min_size=1,
                      max_size=3).map(tuple),
    returns=st.lists(st.sampled_from(["SUBSCRIBED", "CHILDREN", "SPECIAL-USE"]),
                     unique=True).map(tuple),
    status=st.lists(st.sampled_from(STATUS_ITEMS), unique=True, max_size=4).map(tuple),
)
extension_commands = st.one_of(
    # RFC 5161 §3.1, RFC 2971 §3.1, RFC 2342 §5, RFC 3691 §2, RFC 4978 §3
    _cmd("ENABLE", st.lists(atoms, min_size=1, max_size=3).map(tuple)),
    _cmd("ID", st.tuples(st.one_of(st.none(), st.lists(st.tuples(
        id_fields, st.one_of(st.none(), texts)), min_size=1, max_size=3).map(tuple)))),
    *[_cmd(n, st.just(())) for n in ("NAMESPACE", "UNSELECT")],
    _cmd("COMPRESS", st.just(("DEFLATE",))),
    # RFC 6851 §3.1-§3.2
    _cmd("MOVE", st.tuples(seqsets, names)),
    _cmd("MOVE", st.tuples(seqsets, names), uid=True),
    # RFC 6154 §3, RFC 5258 §3 / RFC 5819 §2
    _cmd("CREATE", st.tuples(names, st.lists(special_uses, max_size=2).map(tuple))),
    st.builds(lambda t, ref, o: Command(t, "LIST", (ref, o.patterns[0], o), False), tags,
              texts.filter(lambda s: "\r" not in s), list_options),
    # RFC 9208 §4.1
    _cmd("GETQUOTAROOT", st.tuples(names)),
    _cmd("GETQUOTA", st.tuples(texts)),
    _cmd("SETQUOTA", st.tuples(texts, st.lists(st.tuples(
        st.sampled_from(["STORAGE", "MESSAGE", "MAILBOX"]), st.integers(0, 2**63 - 1)),
        max_size=3).map(tuple))),
    # RFC 5464 §4.2-§4.3
    _cmd("GETMETADATA", st.tuples(st.one_of(st.none(), names),
                                  st.lists(entries, min_size=1, max_size=3).map(tuple),
                                  st.one_of(st.none(), st.integers(0, 2**32 - 1)),
                                  st.sampled_from(["0", "1", "infinity"]))),
    _cmd("SETMETADATA", st.tuples(st.one_of(st.none(), names), st.lists(st.tuples(
        entries, st.one_of(st.none(), st.binary(max_size=20))), min_size=1,
        max_size=3).map(tuple))),
)


def parse_wire(wire: bytes) -> Command:
    framer = Framer(LIMITS)
    framer.receive(wire)
    while True:
        ev = framer.next_event()
        assert ev is not NEED_DATA, wire
        if isinstance(ev, FramedCommand):
            return parse_command(ev, LIMITS)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(commands, extension_commands))
def test_parse_encode_parse_is_a_fixed_point(cmd: Command) -> None:
    once = parse_wire(encode_command(cmd))
    twice = parse_wire(encode_command(once))
    assert once == twice
    if cmd.name == "SEARCH" and cmd.args[1].op == "AND":
        return  # a top-level AND list is flattened into the implicit conjunction
    assert once == cmd


_RESPONSE = re.compile(rb"^(\* |\+ |[!-~]+ (OK|NO|BAD)( |$))")

words = st.sampled_from([
    "LOGIN", "SELECT", "FETCH", "UID", "STORE", "SEARCH", "COPY", "APPEND", "LIST", "LSUB",
    "STATUS", "EXPUNGE", "CLOSE", "IDLE", "DONE", "NOOP", "CREATE", "DELETE", "RENAME",
    "AUTHENTICATE", "PLAIN", "EXAMINE", "INBOX", "Archive", "1", "1:*", "*", "2,3", "(", ")",
    "[", "]", "BODY[]", "BODY.PEEK[HEADER]", "FLAGS", "+FLAGS", "\\Seen", "ALL", "NOT", "OR",
    "\"quoted\"", "{3}", "{0}", "<0.5>", "alice@example.test", "alice-pw-1234", "%", "\"\"",
    "CHARSET", "UTF-8", "TEXT", "HEADER", "1-Jan-2000", "LARGER", "10", "ENVELOPE",
    "BODYSTRUCTURE", "RFC822", "UNSUBSCRIBE", "CHECK", "LOGOUT", "STARTTLS", "\x00", "\xff",
])
lines = st.lists(words, max_size=10).map(lambda ws: " ".join(ws))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["not-authenticated", "authenticated", "selected"]),
       st.lists(st.one_of(lines.map(lambda s: "t " + s), lines), min_size=1, max_size=6),
       st.binary(max_size=30))
def test_every_state_and_input_gives_a_response_never_an_exception(
        state: str, cmds: list[str], noise: bytes) -> None:
    c = Client()
    c.store.ensure_account("alice@example.test")
    c.deliver()
    c.deliver(flags=("\\Seen",))
    if state != "not-authenticated":
        c.login()
    if state == "selected":
        assert c.cmd("s SELECT INBOX")[-1].startswith(b"s OK")
    data = "".join(x + "\r\n" for x in cmds).encode("utf-8", "surrogateescape") + noise
    out = c.feed(data + b"\r\n")
    # Every line outside literals is a response line.
    i = 0
    while i < len(out):
        end = out.index(b"\r\n", i)
        line = out[i:end]
        assert _RESPONSE.match(line), line
        m = re.search(rb"\{(\d+)\}$", line)
        i = end + 2
        while m:  # skip literal data, then the rest of the response line
            i += int(m.group(1))
            end = out.index(b"\r\n", i)
            m = re.search(rb"\{(\d+)\}$", out[i:end])
            i = end + 2


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_give_parse_errors(data: bytes) -> None:
    framer = Framer(Limits(max_line_length=100, max_literal_size=50))
    framer.receive(data)
    for _ in range(1000):
        ev = framer.next_event()
        if ev is NEED_DATA:
            break
        if isinstance(ev, FramedCommand):
            try:
                parse_command(ev, framer.limits)
            except ParseError:
                pass


def test_macros_expand() -> None:
    cmd = parse_wire(b"a FETCH 1 ALL\r\n")
    assert tuple(i.name for i in cmd.args[1]) == MACROS["ALL"]
