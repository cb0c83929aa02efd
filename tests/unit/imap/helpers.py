"""A session driven in memory, as a test client sees it."""

from __future__ import annotations

import random

from node.imap.session import Session
from tests.unit.imap.fakes import FakeStore, make_context

MESSAGE = (
    b"From: Alice Example <alice@example.test>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Subject: Hello there\r\n"
    b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"\r\n"
    b"Body text with a needle in it.\r\n"
)


class Client:
    """Feeds bytes to a Session, whole or split, and collects its output."""

    def __init__(self, store: FakeStore | None = None, *, peer: str = "127.0.0.1",
                 tls: bool = False, split: str = "whole", seed: int = 0, **sections) -> None:
        self.ctx = make_context(store, **sections)
        self.store = self.ctx.store
        self.out = bytearray()
        self.wakeups = 0
        self.session = Session(self.ctx, self.out.extend, peer_ip=peer, tls=tls,
                               wakeup=self._wake)
        self.split = split
        self.rng = random.Random(seed)
        self.session.greeting()
        self.greeting = self.take()

    def _wake(self) -> None:
        self.wakeups += 1

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    def feed(self, data: bytes) -> bytes:
        if self.split == "whole":
            self.session.feed(data)
        elif self.split == "bytes":
            for i in range(len(data)):
                self.session.feed(data[i : i + 1])
        else:
            i = 0
            while i < len(data):
                n = self.rng.randint(1, 7)
                self.session.feed(data[i : i + n])
                i += n
        return self.take()

    def cmd(self, line: str | bytes) -> list[bytes]:
        data = line.encode() if isinstance(line, str) else line
        return self.feed(data + b"\r\n").split(b"\r\n")[:-1]

    def login(self, user: str = "alice@example.test", pw: str = "alice-pw-1234") -> None:
        lines = self.cmd(f"L1 LOGIN {user} {pw}")
        assert lines[-1].startswith(b"L1 OK"), lines

    def deliver(self, raw: bytes = MESSAGE, account: str = "alice@example.test",
                mailbox: str = "INBOX", flags=()) -> int:
        # A fixed INTERNALDATE keeps transcripts comparable.
        return self.store.append(account, mailbox, raw, flags=flags,
                                 internaldate=1700000000.0).uid
