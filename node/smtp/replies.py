"""SMTP replies as named constants (RFC 5321 §4.2, enhanced codes RFC 3463).

Code and tests use the same constants, so a reply's wording lives in one
place.  Whether a reply is temporary (4yz) or permanent (5yz) is a property of
the reply, never a string match.  The text the peer sees never contains an
exception's message: reasons for the log are kept apart by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: three-digit code, optional enhanced status, text lines."""

    code: int
    enhanced: str | None  # "x.y.z" (RFC 3463 §2); None for greeting/EHLO (RFC 2034 §3)
    lines: tuple[str, ...]

    @property
    def positive(self) -> bool:
        """2yz or 3yz (RFC 5321 §4.2.1)."""
        return 200 <= self.code < 400

    @property
    def temporary(self) -> bool:
        """4yz: transient negative completion, the client may retry."""
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        """5yz: permanent negative completion."""
        return 500 <= self.code < 600

    @property
    def closes(self) -> bool:
        """221 and 421 end the session (RFC 5321 §3.8, §4.2.2)."""
        return self.code in (221, 421)

    def with_text(self, *lines: str) -> Reply:
        return Reply(self.code, self.enhanced, tuple(lines))

    def encode(self) -> bytes:
        """Wire form: 'code-' for all but the last line, 'code ' last (§4.2.1)."""
        out = []
        lines = self.lines or ("",)
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            text = f"{self.enhanced} {line}" if self.enhanced else line
            # Never let text break framing: a CR or LF in a line is replaced.
            text = text.replace("\r", " ").replace("\n", " ")
            out.append(f"{self.code}{sep}{text}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8", "replace")


def _r(code: int, enhanced: str | None, text: str) -> Reply:
    return Reply(code, enhanced, (text,))


# --- 2yz: positive completion ------------------------------------------------
OK = _r(250, "2.0.0", "OK")  # RFC 5321 §4.2.2
SENDER_OK = _r(250, "2.1.0", "sender OK")  # RFC 3463 §3.2 (X.1.0 address status)
RECIPIENT_OK = _r(250, "2.1.5", "recipient OK")  # RFC 3463 §3.2 X.1.5 destination valid
QUEUED = _r(250, "2.0.0", "message accepted for delivery")  # §4.2.2, after durable store
RESET_OK = _r(250, "2.0.0", "reset")  # RSET, RFC 5321 §4.1.1.5
NOOP_OK = _r(250, "2.0.0", "OK")  # NOOP, §4.1.1.9
CHUNK_OK = _r(250, "2.0.0", "chunk received")  # BDAT without LAST, RFC 3030 §2
BYE = _r(221, "2.0.0", "closing connection")  # QUIT, §4.1.1.10
VRFY_CANNOT = _r(252, "2.5.2", "cannot VRFY user, but will accept message")  # §3.5.3
EXPN_CANNOT = _r(252, "2.5.2", "cannot EXPN list")  # RFC 5321 §3.5.3 (never disclose)
HELP = Reply(
    214,
    "2.0.0",
    (
        "postroom: commands EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS",
        "see RFC 5321",
    ),
)  # §4.1.1.8
READY_TLS = _r(220, "2.0.0", "ready to start TLS")  # RFC 3207 §4
AUTH_OK = _r(235, "2.7.0", "Authentication successful")  # RFC 4954 §6

# --- 3yz: positive intermediate ------------------------------------------------
START_DATA = _r(354, None, "end data with <CR><LF>.<CR><LF>")  # RFC 5321 §4.2.2

# --- 4yz: transient negative ---------------------------------------------------
SHUTTING_DOWN = _r(421, "4.3.2", "service shutting down, closing connection")  # §3.8
TIMEOUT = _r(421, "4.4.2", "timeout exceeded, closing connection")  # RFC 3463 X.4.2, §4.5.3.2
TOO_MANY_ERRORS = _r(421, "4.7.0", "too many errors, closing connection")  # §4.2.2
TOO_MANY_RECIPIENTS = _r(452, "4.5.3", "too many recipients")  # §4.5.3.1.8, RFC 3463 X.5.3
STORAGE_FAILED = _r(451, "4.3.0", "temporary failure, please try again later")  # RFC 3463 X.3.0
TEMPORARY_FAILURE = _r(451, "4.3.0", "temporary failure, please try again later")  # §4.2.2
# A known address (postmaster@) with no mailbox to deliver to yet: retry later.
NO_MAILBOX_YET = _r(451, "4.3.0", "mailbox not available yet, please try again later")  # X.3.0
TLS_NOT_AVAILABLE = _r(454, "4.7.0", "TLS not available")  # RFC 3207 §4
TOO_MANY_AUTH_FAILURES = _r(421, "4.7.0", "too many authentication failures, closing connection")

# --- 5yz: permanent negative ---------------------------------------------------
SYNTAX_ERROR = _r(500, "5.5.2", "syntax error, command unrecognized")  # §4.2.2, RFC 3463 X.5.2
LINE_TOO_LONG = _r(500, "5.5.2", "line too long")  # §4.5.3.1.4 / §4.5.3.1.6
BARE_LF = _r(500, "5.5.2", "bare LF in command, use CRLF")  # §2.3.8
BAD_BDAT = _r(501, "5.5.4", "invalid BDAT chunk size")  # RFC 3030 §2 (closes: cannot resync)
ARG_SYNTAX = _r(501, "5.5.4", "syntax error in parameters or arguments")  # RFC 3463 X.5.4
BAD_ADDRESS = _r(501, "5.1.3", "bad address syntax")  # RFC 3463 X.1.3
BAD_SENDER = _r(501, "5.1.7", "bad sender address syntax")  # RFC 3463 X.1.7
NOT_IMPLEMENTED = _r(502, "5.5.1", "command not implemented")  # §4.2.2
BAD_SEQUENCE = _r(503, "5.5.1", "bad sequence of commands")  # §4.2.2, RFC 3463 X.5.1
NEED_EHLO = _r(503, "5.5.1", "send EHLO/HELO first")  # §4.1.4
NEED_MAIL = _r(503, "5.5.1", "need MAIL command")  # §4.1.4
NEED_RCPT = _r(503, "5.5.1", "need RCPT command")  # §4.1.4
NESTED_MAIL = _r(503, "5.5.1", "sender already specified")  # §4.1.4
DATA_AFTER_BDAT = _r(503, "5.5.1", "DATA not allowed after BDAT")  # RFC 3030 §2
BINARY_NEEDS_BDAT = _r(503, "5.5.1", "BODY=BINARYMIME requires BDAT")  # RFC 3030 §3
ALREADY_TLS = _r(503, "5.5.1", "TLS already active")  # RFC 3207 §4.2
PARAM_NOT_RECOGNIZED = _r(555, "5.5.4", "parameter not recognized")  # §4.1.1.11
UNKNOWN_USER = _r(550, "5.1.1", "no such user here")  # RFC 3463 X.1.1
RELAY_DENIED = _r(554, "5.7.1", "relay access denied")  # §3.6.2, RFC 3463 X.7.1
MESSAGE_TOO_BIG = _r(552, "5.3.4", "message size exceeds fixed limit")  # RFC 1870 §6, X.3.4
MAILBOX_FULL = _r(552, "5.2.2", "mailbox full")  # RFC 3463 X.2.2 (RFC 9208 quota)
NEEDS_SMTPUTF8 = _r(553, "5.6.7", "non-ASCII address requires SMTPUTF8")  # RFC 6531 §3.5
NO_VALID_RECIPIENTS = _r(554, "5.5.1", "no valid recipients")  # §3.3

# --- submission: AUTH (RFC 4954 §4, §6) and sender rules (RFC 6409 §6.1) --------
AUTH_CANCELLED = _r(501, "5.0.0", "Authentication cancelled")  # RFC 4954 §4 "*"
AUTH_BAD_BASE64 = _r(501, "5.5.2", "Cannot decode base64 response")  # RFC 4954 §4
ALREADY_AUTHENTICATED = _r(503, "5.5.1", "Already authenticated")  # RFC 4954 §4
UNKNOWN_MECHANISM = _r(504, "5.5.4", "Unrecognized authentication type")  # RFC 4954 §4
MUST_STARTTLS = _r(530, "5.7.0", "Must issue a STARTTLS command first")  # RFC 3207 §4
AUTH_REQUIRED = _r(530, "5.7.0", "Authentication required")  # RFC 4954 §6
AUTH_FAILED = _r(535, "5.7.8", "Authentication credentials invalid")  # RFC 4954 §6
SENDER_NOT_OWNED = _r(553, "5.7.1", "Sender address rejected: not owned by user")  # RFC 6409 §6.1
NULL_SENDER_REFUSED = _r(553, "5.7.1", "Sender address rejected: null sender not allowed")
