"""THREAD=ORDEREDSUBJECT and THREAD=REFERENCES (RFC 5256 §3), pure.

`ordered_subject` and `references` take `sort.Item`s (the messages a SEARCH
selected) and return the thread forest as `Node`s; `encode` writes the
RFC 5256 §4 thread-list ("(2)(3 6 (4 23)(44 7 96))").  The numbers shown are
the items' ``seq`` or ``uid`` as the caller chooses (THREAD / UID THREAD).

Both follow the RFC's steps literally (numbered in the comments), with two
bounds: a message's References contribute at most MAX_REFERENCES IDs, and the
loop checks walk at most the depth of the tree they are in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from node.imap.objectid import MSG_ID as _MSG_ID
from node.imap.sort import Item

MAX_REFERENCES = 1000  # Message-IDs taken from one References field


@dataclass(eq=False)
class Node:
    """A message (item) or a dummy (item None) in a thread tree."""

    item: Item | None = None
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)

    @property
    def dummy(self) -> bool:
        return self.item is None


def _sent_key(node: Node) -> tuple[float, int]:
    """RFC 5256 §2.2 sent date, ties by sequence number; a dummy sorts by
    its first child."""
    while node.item is None:
        if not node.children:
            return (0.0, 0)
        node = node.children[0]
    return (node.item.sent, node.item.seq)


# ---------------------------------------------------------------------------
# ORDEREDSUBJECT


def ordered_subject(items: list[Item]) -> list[Node]:
    """RFC 5256 §3 ORDEREDSUBJECT: group by base subject, sort each group by
    sent date; the first message is the parent of all the others (siblings,
    no grandchildren); threads ordered by the sent date of their first message."""
    groups: dict[str, list[Item]] = {}
    for it in sorted(items, key=lambda i: (i.sent, i.seq)):
        groups.setdefault(it.subject[0].casefold(), []).append(it)
    roots = []
    for members in groups.values():
        root = Node(members[0])
        for it in members[1:]:
            root.children.append(Node(it, root))
        roots.append(root)
    roots.sort(key=_sent_key)
    return roots


# ---------------------------------------------------------------------------
# REFERENCES


def _ids(value: str | None) -> list[str]:
    return _MSG_ID.findall(value or "")


def _is_ancestor(a: Node, b: Node) -> bool:
    """True if a is b or one of b's ancestors."""
    node: Node | None = b
    while node is not None:
        if node is a:
            return True
        node = node.parent
    return False


def _link(parent: Node, child: Node) -> None:
    if child.parent is not None:
        child.parent.children.remove(child)
    child.parent = parent
    parent.children.append(child)


def references(items: list[Item]) -> list[Node]:
    """RFC 5256 §3 REFERENCES, steps 1-6."""
    table: dict[str, Node] = {}
    ordered = sorted(items, key=lambda i: i.seq)
    own: list[tuple[Node, list[str]]] = []
    for it in ordered:
        headers = it.headers
        ids = _ids(headers.get("message_id"))
        mid = ids[0] if ids else None
        node = table.get(mid) if mid is not None else None
        if node is not None and node.item is None:
            node.item = it  # a dummy created by an earlier reference
        else:
            # No or invalid Message-ID, or a duplicate of a lower-numbered
            # message's: a unique ID (step 1).
            node = Node(it)
            if mid is not None and mid not in table:
                table[mid] = node
        refs = _ids(headers.get("references"))[-MAX_REFERENCES:]
        if not refs:
            refs = _ids(headers.get("in_reply_to"))[:1]
        own.append((node, refs))
    for node, refs in own:
        # (1)(A) link the references as parent/child, first to last.
        prev: Node | None = None
        for ref in refs:
            cur = table.get(ref)
            if cur is None:
                cur = table[ref] = Node()
            if prev is not None and cur.parent is None and not _is_ancestor(cur, prev):
                _link(prev, cur)
            prev = cur
        # (1)(B) the last reference is the parent of the message (replacing
        # a parent from a truncated References elsewhere), unless a loop.
        if prev is not None and prev is not node and not _is_ancestor(node, prev):
            _link(prev, node)
        elif prev is None and node.parent is not None:
            node.parent.children.remove(node)
            node.parent = None
    # (2) the root set: every container without a parent.
    seen: set[int] = set()
    roots: list[Node] = []
    for n in list(table.values()) + [n for n, _ in own]:
        if n.parent is None and id(n) not in seen:
            seen.add(id(n))
            roots.append(n)
    # (3) prune dummies.
    roots = _prune(roots, top=True)
    # (4) sort the top level by sent date (a dummy by its first child).
    for r in roots:
        if r.dummy:
            r.children.sort(key=_sent_key)
    roots.sort(key=_sent_key)
    # (5) merge threads with the same base subject.
    roots = _merge_subjects(roots)
    # (6) sort every set of siblings, deepest first.
    for r in roots:
        _sort_tree(r)
    roots.sort(key=_sent_key)
    return roots


def _prune(nodes: list[Node], *, top: bool) -> list[Node]:
    out: list[Node] = []
    for n in nodes:
        n.children = _prune(n.children, top=False)
        for c in n.children:
            c.parent = n
        if not n.dummy:
            out.append(n)
        elif not n.children:
            continue  # a dummy without children goes
        elif top and len(n.children) > 1:
            out.append(n)  # children are not promoted to the root
        else:
            for c in n.children:
                c.parent = n.parent
            out.extend(n.children)
    return out


def _thread_subject(node: Node) -> tuple[str, bool]:
    item = node.item if node.item is not None else node.children[0].item
    assert item is not None
    return item.subject[0].casefold(), item.subject[1]


def _merge_subjects(roots: list[Node]) -> list[Node]:
    # (5)(A)-(C): the subject table.
    table: dict[str, Node] = {}
    for r in roots:
        subject, reply = _thread_subject(r)
        if not subject:
            continue
        have = table.get(subject)
        # A dummy, or a non-reply over a reply, takes the place of a message.
        better = have is not None and not have.dummy and (
            r.dummy or (_thread_subject(have)[1] and not reply))
        if have is None or better:
            table[subject] = r
    # (5)(D): merge.
    out: list[Node] = []
    removed: set[int] = set()
    for r in roots:
        if id(r) in removed:
            continue
        subject, reply = _thread_subject(r)
        have = table.get(subject) if subject else None
        if have is None or have is r:
            out.append(r)
            continue
        if have.dummy and r.dummy:
            for c in r.children:
                c.parent = have
            have.children.extend(r.children)
            r.children = []
        elif not r.dummy and (have.dummy or (reply and not _thread_subject(have)[1])):
            # Into the dummy, or a reply under the original: a child of it.
            _link(have, r)
        else:
            dummy = Node()
            if have in out:
                out[out.index(have)] = dummy
            else:
                removed.add(id(have))
                # not yet placed: it will be skipped; the dummy takes its slot
                out.append(dummy)
            _link(dummy, have)
            _link(dummy, r)
            table[subject] = dummy
    return [n for n in out if not (n.dummy and not n.children)]


def _sort_tree(node: Node) -> None:
    for c in node.children:
        _sort_tree(c)
    node.children.sort(key=_sent_key)


# ---------------------------------------------------------------------------
# Output (RFC 5256 §4 thread-list)


def encode(roots: list[Node], uid: bool) -> bytes:
    """`(...)(...)` for the THREAD response; numbers are UIDs if uid."""

    def num(n: Node) -> str:
        assert n.item is not None
        return str(n.item.uid if uid else n.item.seq)

    def members(n: Node) -> str:
        # A dummy shows only its children; a chain of only children is
        # written inline ("3 6"), several children each in parentheses.
        parts: list[str] = []
        while True:
            if not n.dummy:
                parts.append(num(n))
            if len(n.children) == 1 and not n.dummy:
                n = n.children[0]
                continue
            if n.children:
                parts.append("".join(f"({members(c)})" for c in n.children))
            return " ".join(parts)

    return "".join(f"({members(r)})" for r in roots).encode("ascii")
