"""Small fakes of node.context.Directory / MailStore for SMTP session tests.

The real implementations are exercised by tests/interop/test_smtp_clients.py
against a running node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from node.config import Config, SmtpSettings
from node.context import NodeContext
from storage.model import AppendResult, StorageUnavailable


class FakeDirectory:
    def __init__(self) -> None:
        self.domains = {"example.test"}
        self.accounts = {"alice@example.test", "bob@example.test", "postmaster@example.test"}
        self.aliases = {"team@example.test": ["alice@example.test", "bob@example.test"],
                        "al@example.test": ["alice@example.test"]}
        self.quotas: dict[str, int] = {}  # account -> octets (RFC 9208), absent = no limit

    def quota(self, account: str) -> int | None:
        return self.quotas.get(account.lower())

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.domains

    def resolve_recipient(self, address: str) -> list[str] | None:
        local, _, domain = address.rpartition("@")
        address = f"{local.lower()}@{domain.lower()}"
        if address in self.aliases:
            return list(self.aliases[address])
        if address in self.accounts:
            return [address]
        return None

    def account_exists(self, account: str) -> bool:
        return account in self.accounts

    def authenticate(self, username: str, password: str) -> str | None:
        return None


class FakeStore:
    def __init__(self) -> None:
        self.delivered: list[tuple[list[str], bytes]] = []
        self.fail: Exception | None = None
        self.used: dict[str, int] = {}  # account -> octets stored (RFC 9208 usage)

    def usage(self, account: str) -> tuple[int, int]:
        return self.used.get(account, 0), 0

    def deliver(self, accounts: Iterable[str], raw: bytes, **kw: Any) -> list[AppendResult]:
        accounts = list(accounts)
        if self.fail is not None:
            raise self.fail
        self.delivered.append((accounts, raw))
        return [AppendResult(a, "INBOX", 1, len(self.delivered), 1, "0" * 64) for a in accounts]


def make_ctx(**smtp: Any) -> tuple[NodeContext, FakeDirectory, FakeStore]:
    config = Config(smtp=dataclasses.replace(SmtpSettings(), **smtp))
    directory, store = FakeDirectory(), FakeStore()
    ctx = NodeContext(config=config, directory=directory, store=store,  # type: ignore[arg-type]
                      tls=None, hostname="mx.example.test")  # type: ignore[arg-type]
    return ctx, directory, store


__all__ = ["FakeDirectory", "FakeStore", "StorageUnavailable", "make_ctx"]
