"""Real-client IMAP transcripts replayed against a real node.

tests/transcripts/*.txt hold the command sequences that Thunderbird and Apple
Mail send at startup and during sync (format: tests/transcripts/README.md).
Each step checks the tagged status and key untagged responses with regular
expressions.  A step marked ``N: CAP`` runs only when the server advertises
CAP (an extension still being built may be absent); ``N: !CAP`` marks the
fallback a client uses without it.  A transcript is never skipped whole.
"""

from __future__ import annotations

import base64
import datetime
import re
import smtplib
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import pytest

from tests.support.imapwire import Wire

pytestmark = pytest.mark.interop

TRANSCRIPTS = Path(__file__).resolve().parents[1] / "transcripts"
NAMES = sorted(p.stem for p in TRANSCRIPTS.glob("*.txt"))
MIN_TRANSCRIPTS = 2
PASSWORD = "transcript-pw-1234"


@dataclass
class Step:
    line: int
    command: str
    needs: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    status: str = "OK"
    status_text: str | None = None
    actions: list[str] = field(default_factory=list)


@dataclass
class Transcript:
    name: str
    deliver: int = 0
    tag: str = "{n}"
    steps: list[Step] = field(default_factory=list)


def parse_transcript(name: str, text: str) -> Transcript:
    """Parse the line format of tests/transcripts/README.md; raise ValueError on junk."""
    t = Transcript(name)
    step: Step | None = None
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        kind, sep, rest = line.partition(": ")
        if line.startswith("@deliver "):
            t.deliver = int(line.split()[1])
            continue
        if line.startswith("@tag "):
            t.tag = line.split(None, 1)[1]
            continue
        if not sep:
            raise ValueError(f"{name}:{no}: no 'X: ' prefix: {line!r}")
        if kind == "C":
            step = Step(no, rest)
            t.steps.append(step)
            continue
        if step is None:
            raise ValueError(f"{name}:{no}: {kind} before the first C:")
        if kind == "N":
            step.needs += rest.split()
        elif kind == "S":
            re.compile(rest)
            step.present.append(rest)
        elif kind == "S!":
            re.compile(rest)
            step.absent.append(rest)
        elif kind == "R":
            status, _, more = rest.partition(" ")
            if status not in ("OK", "NO", "BAD"):
                raise ValueError(f"{name}:{no}: bad status {status!r}")
            step.status, step.status_text = status, more or None
        elif kind == "A":
            step.actions.append(rest)
        else:
            raise ValueError(f"{name}:{no}: unknown line kind {kind!r}")
    return t


def message(subject: str, to: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Transcript Sender <sender@example.test>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.datetime.now().astimezone())
    msg["Message-ID"] = make_msgid(domain="example.test")
    msg.set_content(f"Body of {subject}.\n")
    return bytes(msg).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class Runner:
    def __init__(self, node, user: str, transcript: Transcript) -> None:
        self.node = node
        self.user = user
        self.t = transcript
        plain = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
        self.vars = {"user": user, "password": PASSWORD, "plain": plain}
        self.caps = self._capabilities()
        self.ran: list[int] = []
        self.skipped: list[int] = []
        self.other: Wire | None = None  # a second session on the same account

    def _capabilities(self) -> set[str]:
        """What the server advertises before and after login (RFC 3501 §7.2.1).

        Authentication steps depend on the first list (AUTH=, SASL-IR), the
        rest on the second; the union serves both.
        """
        w = Wire(self.node.host, self.node.ports["imap"])
        caps: set[str] = set()

        def collect() -> None:
            _, untagged = w.command(b"CAPABILITY")
            for line in untagged:
                if line.upper().startswith(b"* CAPABILITY "):
                    caps.update(line.decode().upper().split()[2:])

        try:
            collect()
            w.command(f'LOGIN "{self.user}" "{PASSWORD}"'.encode())
            collect()
            w.command(b"LOGOUT")
            return caps
        finally:
            w.close()

    def deliver(self, subject: str) -> None:
        with smtplib.SMTP(self.node.host, self.node.ports["smtp"], timeout=30) as s:
            s.sendmail("sender@example.test", [self.user], message(subject, self.user))

    def act(self, action: str) -> None:
        """``deliver SUBJECT`` over SMTP, or ``other COMMAND`` in a second session.

        The second session logs in and selects INBOX on first use; its
        command must succeed.
        """
        verb, _, arg = action.partition(" ")
        if verb == "deliver":
            self.deliver(arg)
            return
        assert verb == "other", action
        if self.other is None:
            self.other = Wire(self.node.host, self.node.ports["imap"])
            for setup in (f'LOGIN "{self.user}" "{PASSWORD}"', "SELECT INBOX"):
                tagged, _ = self.other.command(setup.encode())
                assert b" OK" in tagged, tagged
        tagged, _ = self.other.command(self.expand(arg))
        assert b" OK" in tagged, (action, tagged)

    def wanted(self, step: Step) -> bool:
        for need in step.needs:
            if need.startswith("!"):
                if need[1:].upper() in self.caps:
                    return False
            elif need.upper() not in self.caps:
                return False
        return True

    def expand(self, text: str) -> bytes:
        def var(m: re.Match) -> str:
            if m.group(1) not in self.vars:
                raise AssertionError(f"{self.t.name}: ${{{m.group(1)}}} was never captured")
            return self.vars[m.group(1)]

        text = re.sub(r"\$\{(\w+)\}", var, text)
        out = b""
        pos = 0
        for m in re.finditer(r"\{\{message ([^}]*)\}\}", text):
            body = message(m.group(1), self.user)
            out += text[pos:m.start()].encode() + b"{%d}\r\n" % len(body) + body
            pos = m.end()
        return out + text[pos:].encode()

    def run(self) -> None:
        for i in range(self.t.deliver):
            self.deliver(f"preloaded message {i + 1}")
        wire = Wire(self.node.host, self.node.ports["imap"])
        try:
            assert wire.greeting.startswith(b"* OK"), wire.greeting
            for n, step in enumerate(self.t.steps, start=1):
                if not self.wanted(step):
                    self.skipped.append(step.line)
                    continue
                self.ran.append(step.line)
                self.run_step(wire, self.t.tag.format(n=n), step)
        finally:
            wire.close()
            if self.other is not None:
                self.other.close()

    def run_step(self, wire: Wire, tag: str, step: Step) -> None:
        where = f"{self.t.name}:{step.line} {step.command!r}"
        command = self.expand(step.command)
        if command.upper() != b"IDLE":
            for action in step.actions:
                self.act(action)
        if command.upper() == b"IDLE":
            tagged, untagged = self.idle(wire, tag, step)
        elif command.upper() == b"LOGOUT":
            tagged, untagged = wire.command(command, tag)
            assert any(u.startswith(b"* BYE") for u in untagged), where
        else:
            tagged, untagged = wire.command(command, tag)
        text = [u.decode("utf-8", "replace").rstrip("\r\n") for u in untagged]
        status = tagged.decode("utf-8", "replace").split(" ", 2)
        assert status[1:2] == [step.status], f"{where}: got {tagged!r}\n" + "\n".join(text)
        if step.status_text:
            assert re.search(step.status_text, status[2], re.I), f"{where}: {tagged!r}"
        for pattern in step.present:
            for line in text:
                m = re.match(pattern, line, re.I | re.S)
                if m:
                    self.vars.update({k: v for k, v in m.groupdict().items() if v is not None})
                    break
            else:
                raise AssertionError(f"{where}: no untagged response matches {pattern!r}:\n"
                                     + "\n".join(text))
        for pattern in step.absent:
            bad = [line for line in text if re.match(pattern, line, re.I | re.S)]
            assert not bad, f"{where}: unexpected {bad}"

    def idle(self, wire: Wire, tag: str, step: Step) -> tuple[bytes, list[bytes]]:
        """RFC 2177: IDLE, '+', the actions, the awaited untagged data, DONE."""
        wire.send(tag.encode() + b" IDLE\r\n")
        untagged: list[bytes] = []
        line = wire.read_response_line()
        if not line.startswith(b"+"):
            return line, untagged
        for action in step.actions:
            self.act(action)
        waiting = list(step.present)
        while waiting:  # the socket timeout is the deadline
            line = wire.read_response_line()
            untagged.append(line)
            text = line.decode("utf-8", "replace")
            waiting = [p for p in waiting if not re.match(p, text, re.I | re.S)]
        wire.send(b"DONE\r\n")
        while True:
            line = wire.read_response_line()
            if line.startswith(tag.encode() + b" "):
                return line, untagged
            untagged.append(line)


def test_there_are_transcripts() -> None:
    assert len(NAMES) >= MIN_TRANSCRIPTS


@pytest.mark.parametrize("name", NAMES)
def test_transcript_parses(name: str) -> None:
    t = parse_transcript(name, (TRANSCRIPTS / f"{name}.txt").read_text(encoding="utf-8"))
    assert len(t.steps) >= 10
    assert t.steps[-1].command.upper() == "LOGOUT"


def test_parser_rejects_junk() -> None:
    with pytest.raises(ValueError):
        parse_transcript("junk", "C: NOOP\nX: what\n")
    with pytest.raises(ValueError):
        parse_transcript("junk", "S: \\* OK\n")
    with pytest.raises(ValueError):
        parse_transcript("junk", "C: NOOP\nR: MAYBE\n")


@pytest.mark.parametrize("name", NAMES)
def test_replay(postroom_node, name: str) -> None:
    node = postroom_node
    user = f"{re.sub(r'[^a-z0-9]', '', name.lower())}@example.test"
    node.add_user(user, PASSWORD)
    t = parse_transcript(name, (TRANSCRIPTS / f"{name}.txt").read_text(encoding="utf-8"))
    runner = Runner(node, user, t)
    runner.run()
    # Every step without an extension marker ran; report what was skipped.
    assert runner.ran
    unmarked = [s.line for s in t.steps if not s.needs]
    assert set(unmarked) <= set(runner.ran)
    if runner.skipped:
        print(f"{name}: skipped steps at lines {runner.skipped} (capabilities not advertised)")

