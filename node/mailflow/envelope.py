"""The SMTP envelope of one received message (RFC 5321 §2.3.1, DSN: RFC 3461).

Kept with the message from the SMTP session to delivery.  DSN parameters are
carried unchanged: local delivery does not act on them yet; outbound relay
and DSN generation read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipient:
    address: str  # the RCPT mailbox as given ("postmaster" for bare <postmaster>)
    accounts: tuple[str, ...]  # local accounts after alias expansion
    notify: tuple[str, ...] | None = None  # RFC 3461 §4.1 NOTIFY=, upper-case
    orcpt: str | None = None  # RFC 3461 §4.2 ORCPT= decoded: "rfc822;user@example"


@dataclass
class Envelope:
    sender: str  # "" for the null reverse-path <>
    helo: str = ""
    peer_ip: str = ""
    protocol: str = "ESMTP"  # RFC 3848 with-protocol: SMTP, ESMTP, ESMTPS, UTF8SMTPS, ...
    tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" when TLS was used
    recipients: list[Recipient] = field(default_factory=list)
    body: str | None = None  # RFC 6152 / RFC 3030 BODY= value, upper-case
    smtputf8: bool = False  # RFC 6531 §3.4
    size: int | None = None  # RFC 1870 SIZE= declared by the client
    ret: str | None = None  # RFC 3461 §4.3 RET=FULL|HDRS
    envid: str | None = None  # RFC 3461 §4.4 ENVID= decoded

    def accounts(self) -> list[str]:
        """Every account once, in first-recipient order (alias + direct = one copy)."""
        seen: dict[str, str] = {}
        for rcpt in self.recipients:
            for account in rcpt.accounts:
                seen.setdefault(account.lower(), account)
        return list(seen.values())
