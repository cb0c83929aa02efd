"""Wire forms of the extension commands (the client side of their parsers),
for protocol.encode_command: the parse→encode→parse property covers them
(tests/property/test_imap_protocol.py) and tests and benchmarks can send them.

Synchronizing literals only, like encode_command (RFC 9051 §4.3); mailbox
names in modified UTF-7, the IMAP4rev1 form every parser accepts by default.
"""

from __future__ import annotations

from node.imap import protocol as P
from node.imap.protocol import Command, encode_astring, encode_string


def _mailbox(name: str) -> bytes:
    return encode_astring(P.encode_mailbox(name))


def _nstring(value: bytes | None) -> bytes:
    if value is None:
        return b"NIL"
    if b"\x00" in value:  # RFC 3516 §4.3 literal8 (SETMETADATA, RFC 5464 §5)
        return b"~{%d}\r\n" % len(value) + value
    return encode_string(value)


def encode_args(cmd: Command) -> list[bytes]:
    """The arguments after ``tag NAME`` of an extension command; [] for a
    command without arguments (NAMESPACE, UNSELECT, ...)."""
    a, name = cmd.args, cmd.name
    if name == "ENABLE":  # RFC 5161 §3.1
        return [n.encode("ascii") for n in a]
    if name == "ID":  # RFC 2971 §3.1
        if a[0] is None:
            return [b"NIL"]
        pairs = [encode_string(k) + b" " + (b"NIL" if v is None else encode_string(v))
                 for k, v in a[0]]
        return [b"(" + b" ".join(pairs) + b")"]
    if name == "COMPRESS":  # RFC 4978 §3
        return [a[0].encode("ascii")]
    if name == "MOVE":  # RFC 6851 §3.1, like COPY
        return [a[0].encode().encode("ascii"), _mailbox(a[1])]
    if name == "CREATE":  # RFC 6154 §3 (USE) on RFC 9051 §6.3.4
        out = [_mailbox(a[0])]
        if len(a) > 1:
            out.append(b"(USE (" + " ".join(a[1]).encode("ascii") + b"))")
        return out
    if name == "LIST":  # RFC 5258 §3 extended LIST (node/imap/commands/listext.py)
        from node.imap.commands.listext import encode_list

        head = f"{cmd.tag} LIST ".encode("ascii")
        line = encode_list(cmd)
        assert line.startswith(head) and line.endswith(b"\r\n")
        return [line[len(head) : -2]]
    if name == "GETQUOTAROOT":  # RFC 9208 §4.1.2
        return [_mailbox(a[0])]
    if name == "GETQUOTA":  # RFC 9208 §4.1.1
        return [encode_astring(a[0])]
    if name == "SETQUOTA":  # RFC 9208 §4.1.3
        limits = " ".join(f"{res} {n}" for res, n in a[1])
        return [encode_astring(a[0]), b"(" + limits.encode("ascii") + b")"]
    if name == "GETMETADATA":  # RFC 5464 §4.2
        mailbox, entries, maxsize, depth = a
        opts = ([f"MAXSIZE {maxsize}"] if maxsize is not None else []) + (
            [f"DEPTH {depth}"] if depth != "0" else [])
        out = [b"(" + " ".join(opts).encode("ascii") + b")"] if opts else []
        out.append(_mailbox(mailbox or ""))
        out.append(b"(" + b" ".join(encode_astring(e) for e in entries) + b")")
        return out
    if name == "SETMETADATA":  # RFC 5464 §4.3
        mailbox, pairs = a
        body = b" ".join(encode_astring(e) + b" " + _nstring(v) for e, v in pairs)
        return [_mailbox(mailbox or ""), b"(" + body + b")"]
    return []
