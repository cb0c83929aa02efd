"""The drill's FETCH reading (cluster/drill.py fetch_messages): an unsolicited
FETCH for a flag change made by another session carries a UID but no header
and must not replace the message's Message-ID."""

from cluster.drill import fetch_messages


class _Recorded:
    """Answers one command with recorded untagged lines (literals inlined)."""

    def __init__(self, untagged: list[bytes]) -> None:
        self.untagged = untagged
        self.sent: list[str] = []

    def command(self, text: str) -> tuple[list[bytes], bytes]:
        self.sent.append(text)
        return self.untagged, b"d1 OK UID FETCH completed"


def test_unsolicited_flag_fetch_does_not_hide_the_message_id() -> None:
    client = _Recorded([
        b"* 1 FETCH (UID 56 MODSEQ (7) FLAGS (\\Seen) BODY[HEADER.FIELDS (MESSAGE-ID)] {33}\r\n"
        b"Message-ID: <a.1@postroom.drill>\r\n\r\n)",
        b"* 1 FETCH (UID 56 MODSEQ (9) FLAGS (\\Seen \\Flagged))",
        b"* 2 FETCH (UID 57 MODSEQ (8) FLAGS () BODY[HEADER.FIELDS (MESSAGE-ID)] {33}\r\n"
        b"Message-ID: <a.2@postroom.drill>\r\n\r\n)",
    ])
    assert fetch_messages(client, 56) == [
        (56, "<a.1@postroom.drill>", 7, False),
        (57, "<a.2@postroom.drill>", 8, False),
    ]
    assert client.sent == [
        "UID FETCH 56:* (UID MODSEQ FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"]


def test_the_last_message_answered_for_n_star_is_skipped() -> None:
    client = _Recorded([
        b"* 9 FETCH (UID 40 MODSEQ (3) FLAGS (\\Flagged) BODY[HEADER.FIELDS (MESSAGE-ID)] {33}\r\n"
        b"Message-ID: <a.9@postroom.drill>\r\n\r\n)",
    ])
    assert fetch_messages(client, 41) == []
