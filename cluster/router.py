"""ClusterStore: the MailStore seen by sessions in cluster mode.

Theory of operation: every account belongs to one shard, and only that
shard's primary may commit to it (docs/cluster.md).  `ClusterStore` asks the
`ClusterView` where the account's shard is led:

- led here (``is_local_primary``): the node's own MailStore, unchanged;
- led elsewhere: one RPC to the primary's `store.call` (or `store.deliver`
  for deliveries, the message riding as an attachment), which runs the same
  MailStore method there and answers once it committed;
- no primary known, or its RPC address unknown or unreachable:
  `StorageUnavailable` (SMTP answers 451 4.3.0, IMAP NO [UNAVAILABLE]).

A storage error raised on the primary (NoSuchMailbox, StorageUnavailable, any
`storage.model.StorageError` subclass) is raised here as the same class, from
the RPC error's ``kind``.  Arguments and results cross the wire in a small
tagged JSON form (`encode`/`decode`): bytes become attachments, tuples,
sets and int-keyed dicts keep their type, and the dataclasses of
storage/model.py are rebuilt field by field from a whitelist (no pickle).

What runs where: IMAP and POP3 sessions run on the account's primary
(cluster/proxy.py hands them there after login), so their reads, their
`watch` and `read_message` are local.  Calls made outside sessions (SMTP
delivery, DSNs, the queue runner's local deliveries, quota checks with
`usage`) are the ones that take the RPC path in practice; every other
account-keyed method works the same way.  `watch` of an account led
elsewhere raises StorageUnavailable, and `read_message` reads the local
BlobStore only (bodies are replicated with the operations that need them).

`register_handlers` is the primary's side: it serves `store.deliver` and
`store.call` on the local MailStore, refusing (StorageUnavailable) any
account whose shard this node does not lead, so a stale view on the caller
never commits anywhere but on the real primary.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent

from cluster.rpc import RpcClient, RpcError, RpcServer, RpcUnavailable
from node.context import ClusterView, MailStore
from storage import model
from storage.model import (
    AppendResult,
    FlagChange,
    MailboxChanges,
    MailboxInfo,
    MailboxStatus,
    MessageRow,
    NotLeader,
    StorageError,
    StorageUnavailable,
    TextHits,
)

log = logging.getLogger("postroom.cluster.router")

# Account-keyed MailStore methods `store.call` runs (first argument: account).
CALLABLE = frozenset({
    "ensure_account", "delete_account", "append", "list_mailboxes", "create_mailbox",
    "delete_mailbox", "rename_mailbox", "set_subscribed", "status", "messages", "metadata",
    "mailbox_state",
    "rows", "uid_flags", "store_flags", "expunge", "copy", "move", "changes_since",
    "search_text", "usage", "savedates", "get_metadata", "set_metadata",
    "restore_mailbox",  # in-place restores (storage/restore.py), blobs as attachments
})
# RPC error kinds meaning the call never ran there (cluster/rpc.py): try later.
NOT_RUN = frozenset({"Expired", "NoSuchMethod"})
SETTLE = 5.0  # default [cluster] settle: seconds a NotLeader refusal is retried (re-routed)
# Result types rebuilt by `decode` (storage/model.py dataclasses, by name).
DATACLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (AppendResult, FlagChange, MailboxChanges, MailboxInfo, MailboxStatus,
                MessageRow, TextHits)
}


# ------------------------------------------------------------------ codec


def encode(value: Any, attachments: list[bytes]) -> Any:
    """A JSON-able form of value; bytes are appended to attachments."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        attachments.append(bytes(value))
        return {"$b": len(attachments) - 1}
    if dataclasses.is_dataclass(value) and type(value).__name__ in DATACLASSES:
        fields = {f.name: encode(getattr(value, f.name), attachments)
                  for f in dataclasses.fields(value)}
        return {"$dc": type(value).__name__, "f": fields}
    if isinstance(value, dict):
        return {"$d": [[encode(k, attachments), encode(v, attachments)]
                       for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"$t": [encode(v, attachments) for v in value]}
    if isinstance(value, set | frozenset):
        return {"$s": [encode(v, attachments) for v in sorted(value, key=repr)]}
    if isinstance(value, list | Iterable):
        return [encode(v, attachments) for v in value]
    raise TypeError(f"cannot send a {type(value).__name__} to another node")


def decode(value: Any, attachments: list[bytes]) -> Any:
    """The inverse of `encode`; unknown tags or classes raise ValueError."""
    if isinstance(value, list):
        return [decode(v, attachments) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and "$b" in value:
        return attachments[int(value["$b"])]
    if len(value) == 1 and "$d" in value:
        return {decode(k, attachments): decode(v, attachments) for k, v in value["$d"]}
    if len(value) == 1 and "$t" in value:
        return tuple(decode(v, attachments) for v in value["$t"])
    if len(value) == 1 and "$s" in value:
        return frozenset(decode(v, attachments) for v in value["$s"])
    if set(value) == {"$dc", "f"} and value["$dc"] in DATACLASSES:
        cls = DATACLASSES[value["$dc"]]
        return cls(**{k: decode(v, attachments) for k, v in value["f"].items()})
    raise ValueError(f"unknown value on the wire: {sorted(value)[:3]}")


def remote_error(exc: RpcError) -> StorageError:
    """The storage exception a primary raised, as the same class here.

    Unreachable primaries and unknown kinds become StorageUnavailable /
    StorageError: the caller only ever sees storage errors.
    """
    if isinstance(exc, RpcUnavailable):
        return StorageUnavailable(f"primary unreachable: {exc}")
    if getattr(exc, "kind", None) in NOT_RUN:
        return StorageUnavailable(f"the primary did not run the call: {exc}")
    cls = getattr(model, getattr(exc, "kind", "") or "", None)
    message = getattr(exc, "message", None) or str(exc)
    if isinstance(cls, type) and issubclass(cls, StorageError):
        try:
            return cls(message)
        except TypeError:  # a class with other constructor arguments
            pass
    return StorageError(f"{getattr(exc, 'kind', 'error')} on the primary: {message}")


# ------------------------------------------------------------ caller side


class ClusterStore:
    """node.context.MailStore over the cluster (see the module docstring)."""

    def __init__(
        self, store: MailStore, view: ClusterView, rpc: RpcClient, timeout: float = 10.0,
        settle: float = SETTLE,
    ) -> None:
        self.local = store
        self.view = view
        self.rpc = rpc
        self.timeout = float(timeout)
        self.settle = float(settle)  # seconds NotLeader refusals are re-routed ([cluster] settle)

    # -- routing

    def primary_address(self, account: str) -> str | None:
        """None when this node leads the account's shard, else the RPC address
        of its primary; StorageUnavailable when there is none to reach."""
        number = self.view.shard_of(account)
        if self.view.is_local_primary(number):
            return None
        primary = self.view.primary_of(number)
        if primary is None:
            raise NotLeader(f"shard {number} has no primary")
        if primary == self.view.node_name:
            raise NotLeader(f"shard {number}: this node is not leading it yet")
        address = self.view.rpc_address(primary)
        if address is None:
            raise NotLeader(f"shard {number}: primary {primary} is not a member")
        return address

    def _settled(self, fn: Callable[[], Any]) -> Any:
        """fn(), retried while it fails with NotLeader (nothing ran: a hand-off
        or promotion is in progress) for at most ``settle`` seconds, so clients
        see a short delay instead of a temporary failure."""
        deadline = time.monotonic() + self.settle
        delay = 0.05
        while True:
            try:
                return fn()
            except NotLeader:
                if time.monotonic() + delay > deadline:
                    raise
                gevent.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _call(self, method: str, account: str, *args: Any, **kwargs: Any) -> Any:
        return self._settled(lambda: self._call_once(method, account, *args, **kwargs))

    def _call_once(self, method: str, account: str, *args: Any, **kwargs: Any) -> Any:
        address = self.primary_address(account)
        if address is None:
            return getattr(self.local, method)(account, *args, **kwargs)
        attachments: list[bytes] = []
        payload = {"method": method, "account": account,
                   "args": encode(list(args), attachments),
                   "kwargs": encode(kwargs, attachments)}
        try:
            result, blobs = self.rpc.call(address, "store.call", payload, attachments,
                                          timeout=self.timeout)
        except RpcError as exc:
            raise remote_error(exc) from exc
        return decode(result.get("result"), blobs)

    # -- deliveries

    def deliver(
        self,
        accounts: Iterable[str],
        raw: bytes,
        *,
        mailbox: str = "INBOX",
        flags: Iterable[str] = (),
        internaldate: float | None = None,
        meta: dict | None = None,
    ) -> list[AppendResult]:
        """MailStore.deliver across primaries: the accounts led here are
        stored locally, the others with one `store.deliver` per primary, all
        at once.  Raises the first failure after every part has finished
        (the others may have committed: the sender retries, at-least-once)."""
        targets = list(dict.fromkeys(a.lower() for a in accounts))
        if not targets:
            return []
        flags = list(flags)
        by_account: dict[str, AppendResult] = {}
        error: BaseException | None = None
        pending = targets
        deadline = time.monotonic() + self.settle
        delay = 0.05
        while pending:
            # Accounts refused with NotLeader ran nowhere: they are tried again
            # (re-routed) while placement settles; every other outcome is final.
            retry: list[str] = []
            groups: dict[str | None, list[str]] = {}
            for account in pending:
                try:
                    groups.setdefault(self.primary_address(account), []).append(account)
                except NotLeader as exc:
                    retry.append(account)
                    last_refusal: BaseException = exc
            parts = [(address, group, raw, mailbox, flags, internaldate, meta)
                     for address, group in groups.items()]
            if len(parts) == 1:
                outcomes = [self._deliver_part(*parts[0])]
            else:
                jobs = [gevent.spawn(self._deliver_part, *part) for part in parts]
                gevent.joinall(jobs)
                outcomes = [job.value if job.successful() else job.exception for job in jobs]
            for (_, group, *_rest), outcome in zip(parts, outcomes, strict=True):
                if isinstance(outcome, NotLeader):
                    retry += group
                    last_refusal = outcome
                elif isinstance(outcome, BaseException):
                    error = error or outcome
                else:
                    by_account.update((r.account, r) for r in outcome)
            if retry and time.monotonic() + delay > deadline:
                error = error or last_refusal
                break
            if retry:
                gevent.sleep(delay)
                delay = min(delay * 2, 0.5)
            pending = retry
        if error is not None:
            raise error
        return [by_account[a] for a in targets if a in by_account]

    def _deliver_part(
        self, address: str | None, accounts: list[str], raw: bytes, mailbox: str,
        flags: list[str], internaldate: float | None, meta: dict | None,
    ) -> list[AppendResult] | StorageError:
        """One primary's share of a delivery: its results, or the error."""
        try:
            return self._deliver_to(address, accounts, raw, mailbox, flags, internaldate, meta)
        except StorageError as exc:
            return exc

    def _deliver_to(
        self, address: str | None, accounts: list[str], raw: bytes, mailbox: str,
        flags: list[str], internaldate: float | None, meta: dict | None,
    ) -> list[AppendResult]:
        if address is None:
            kwargs: dict[str, Any] = {"meta": meta} if meta is not None else {}
            return self.local.deliver(accounts, raw, mailbox=mailbox, flags=flags,
                                      internaldate=internaldate, **kwargs)
        args = {"accounts": accounts, "mailbox": mailbox, "flags": flags,
                "internaldate": internaldate}
        try:
            result, _ = self.rpc.call(address, "store.deliver", args, [raw],
                                      timeout=self.timeout)
        except RpcError as exc:
            raise remote_error(exc) from exc
        return [decode(r, []) for r in result["results"]]

    # -- node-local

    def read_message(self, blob: str) -> bytes:
        """The local BlobStore: only IMAP/POP3 read bodies, and they run on
        the primary, where every body of its shards is stored."""
        return self.local.read_message(blob)

    def watch(self, account: str, callback: Callable[[str], None]) -> Callable[[], None]:
        """Local watchers only: sessions of an account run on its primary."""
        if self.primary_address(account) is not None:
            raise StorageUnavailable("the account's shard is led by another node")
        return self.local.watch(account, callback)

    # -- account-keyed methods (local or one `store.call`)

    def ensure_account(self, account: str) -> None:
        return self._call("ensure_account", account)

    def delete_account(self, account: str) -> None:
        return self._call("delete_account", account)

    def append(self, account: str, mailbox: str, raw: bytes, *, flags: Iterable[str] = (),
               internaldate: float | None = None) -> AppendResult:
        return self._call("append", account, mailbox, raw, flags=list(flags),
                          internaldate=internaldate)

    def list_mailboxes(self, account: str) -> list[MailboxInfo]:
        return self._call("list_mailboxes", account)

    def create_mailbox(self, account: str, name: str,
                       special_use: str | None = None) -> MailboxInfo:
        return self._call("create_mailbox", account, name, special_use)

    def delete_mailbox(self, account: str, name: str) -> None:
        return self._call("delete_mailbox", account, name)

    def rename_mailbox(self, account: str, old: str, new: str) -> None:
        return self._call("rename_mailbox", account, old, new)

    def set_subscribed(self, account: str, name: str, subscribed: bool) -> None:
        return self._call("set_subscribed", account, name, subscribed)

    def status(self, account: str, name: str) -> MailboxStatus:
        return self._call("status", account, name)

    def mailbox_state(self, account: str, name: str) -> tuple[int, int, int]:
        return self._call("mailbox_state", account, name)

    def messages(self, account: str, name: str) -> list[MessageRow]:
        return self._call("messages", account, name)

    def metadata(self, account: str, name: str, uids: Iterable[int]) -> dict[int, dict]:
        return self._call("metadata", account, name, list(uids))

    def rows(self, account: str, name: str, uids: Iterable[int]) -> dict[int, MessageRow]:
        return self._call("rows", account, name, list(uids))

    def uid_flags(self, account: str, name: str) -> list[tuple[int, frozenset[str]]]:
        return self._call("uid_flags", account, name)

    def store_flags(self, account: str, name: str, uids: Iterable[int], mode: str,
                    flags: Iterable[str], unchanged_since: int | None = None) -> list[FlagChange]:
        return self._call("store_flags", account, name, list(uids), mode, list(flags),
                          unchanged_since)

    def expunge(self, account: str, name: str, uids: Iterable[int]) -> list[int]:
        return self._call("expunge", account, name, list(uids))

    def copy(self, account: str, src: str, uids: Iterable[int],
             dst: str) -> tuple[int, list[tuple[int, int]]]:
        return self._call("copy", account, src, list(uids), dst)

    def move(self, account: str, src: str, uids: Iterable[int],
             dst: str) -> tuple[int, list[tuple[int, int]]]:
        return self._call("move", account, src, list(uids), dst)

    def changes_since(self, account: str, name: str, modseq: int) -> MailboxChanges:
        return self._call("changes_since", account, name, modseq)

    def search_text(self, account: str, name: str, field: str, needle: str) -> TextHits | None:
        return self._call("search_text", account, name, field, needle)

    def usage(self, account: str) -> tuple[int, int]:
        return self._call("usage", account)

    def savedates(self, account: str, name: str, uids: Iterable[int]) -> dict[int, float | None]:
        return self._call("savedates", account, name, list(uids))

    def get_metadata(self, account: str, mailbox: str | None) -> dict[str, bytes]:
        return self._call("get_metadata", account, mailbox)

    def set_metadata(self, account: str, mailbox: str | None,
                     entries: Iterable[tuple[str, bytes | None]]) -> None:
        return self._call("set_metadata", account, mailbox, [tuple(e) for e in entries])


# ----------------------------------------------------------- primary side


def register_handlers(rpc_server: RpcServer, store: MailStore, view: ClusterView) -> None:
    """Serve `store.deliver` and `store.call` from the local MailStore for the
    accounts of shards this node leads."""

    def require_lead(account: str) -> None:
        if not isinstance(account, str) or not account:
            raise StorageError("bad account name")
        number = view.shard_of(account)
        if not view.is_local_primary(number):
            raise NotLeader(f"{view.node_name} does not lead shard {number}")

    def deliver(peer: str, args: dict, attachments: list[bytes]) -> tuple[dict, list[bytes]]:
        accounts = [str(a) for a in args.get("accounts") or ()]
        if len(attachments) != 1:
            raise StorageError("store.deliver takes the message as its one attachment")
        for account in accounts:
            require_lead(account)
        results = store.deliver(
            accounts, attachments[0], mailbox=str(args.get("mailbox") or "INBOX"),
            flags=[str(f) for f in args.get("flags") or ()],
            internaldate=args.get("internaldate"),
        )
        return {"results": [encode(r, []) for r in results]}, []

    def call(peer: str, args: dict, attachments: list[bytes]) -> tuple[dict, list[bytes]]:
        method, account = args.get("method"), args.get("account")
        if method not in CALLABLE:
            raise StorageError(f"store.call: {method!r} is not a MailStore method")
        require_lead(account)
        positional = decode(args.get("args") or [], attachments)
        keywords = decode(args.get("kwargs") or {"$d": []}, attachments)
        if not isinstance(positional, list) or not isinstance(keywords, dict):
            raise StorageError("store.call: malformed arguments")
        result = getattr(store, method)(account, *positional, **keywords)
        out: list[bytes] = []
        return {"result": encode(result, out)}, out

    rpc_server.register("store.deliver", deliver)
    rpc_server.register("store.call", call)
