"""LIST/LSUB mailbox patterns (RFC 3501 §6.3.8) matched without backtracking.

"*" matches any run of characters, "%" any run without the hierarchy
delimiter.  A regular expression built from a client's pattern backtracks
exponentially on inputs like ``*%*%*%...x`` and would stall the hub, so the
match is a set simulation instead: the set of name positions reachable after
each pattern token is a bitmask (bit i = "the first i characters are
matched"), and every token moves the whole set at once.  The cost is
O(tokens x name length / word size), whatever the pattern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKENS = re.compile(r"[*%]+|[^*%]+")


@dataclass(frozen=True)
class Pattern:
    """A compiled pattern: literals and wildcards, runs of wildcards collapsed."""

    tokens: tuple[str, ...]
    delimiter: str

    @classmethod
    def compile(cls, pattern: str, delimiter: str = "/") -> Pattern:
        tokens = []
        for run in _TOKENS.findall(pattern):
            if run[0] in "*%":
                # "*" anywhere in a run of wildcards makes the run match anything.
                tokens.append("*" if "*" in run else "%")
            else:
                tokens.append(run)
        return cls(tuple(tokens), delimiter)

    def matches(self, name: str, *, inbox_case_insensitive: bool = True) -> bool:
        """True when the whole name matches.  INBOX is case-insensitive
        (RFC 3501 §5.1), also as the first level of a longer pattern."""
        if _simulate(self.tokens, name, self.delimiter):
            return True
        if inbox_case_insensitive and (
            name == "INBOX" or name.startswith("INBOX" + self.delimiter)
        ):
            # The name's first level is "INBOX": compare the pattern's first
            # level case-insensitively by upper-casing its literals.
            return _simulate(_upper_first_level(self.tokens, self.delimiter), name, self.delimiter)
        return False


def _upper_first_level(tokens: tuple[str, ...], delimiter: str) -> tuple[str, ...]:
    out, upper = [], True
    for token in tokens:
        if upper and token not in ("*", "%"):
            head, sep, rest = token.partition(delimiter)
            out.append(head.upper() + sep + rest)
            if sep:
                upper = False
        else:
            out.append(token)
    return tuple(out)


def _simulate(tokens: tuple[str, ...], name: str, delimiter: str) -> bool:
    n = len(name)
    full = (1 << (n + 1)) - 1
    states = 1  # position 0 reachable
    for token in tokens:
        if not states:
            return False
        if token == "*":
            lowest = states & -states
            states = full & ~(lowest - 1)
        elif token == "%":
            states = _extend_within_levels(states, name, delimiter)
        else:
            hits = 0
            start = name.find(token)
            while start != -1:
                hits |= 1 << start
                start = name.find(token, start + 1)
            states = ((states & hits) << len(token)) & full
    return bool(states >> n & 1)


def _extend_within_levels(states: int, name: str, delimiter: str) -> int:
    """From each reachable position, reach every later one before a delimiter."""
    out = states
    start = 0
    n = len(name)
    while start <= n:
        end = name.find(delimiter, start)
        end = n if end == -1 else end
        # Positions start..end (end = the delimiter's position, or n).
        window = ((1 << (end + 1)) - 1) & ~((1 << start) - 1)
        inside = states & window
        if inside:
            lowest = inside & -inside
            out |= window & ~(lowest - 1)
        start = end + 1
    return out
