"""MTA-STS TXT records, policy bodies and MX patterns (RFC 8461 §3.1, §3.2, §4.1)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.outbound.mtasts import StsError, StsPolicy, mx_matches, parse_policy, parse_txt

# RFC 8461 §3.2, the example policy.
RFC_EXAMPLE = (
    "version: STSv1\r\n"
    "mode: enforce\r\n"
    "mx: mail.example.com\r\n"
    "mx: *.example.net\r\n"
    "mx: backupmx.example.com\r\n"
    "max_age: 604800\r\n"
)


def test_rfc_example_policy() -> None:  # RFC 8461 §3.2
    mode, mx, max_age = parse_policy(RFC_EXAMPLE)
    assert mode == "enforce"
    assert mx == ("mail.example.com", "*.example.net", "backupmx.example.com")
    assert max_age == 604800


def test_lf_line_ends_and_no_final_newline() -> None:  # §3.2: CRLF and LF both accepted
    assert parse_policy(RFC_EXAMPLE.replace("\r\n", "\n").rstrip("\n")) == parse_policy(RFC_EXAMPLE)


def test_field_order_free_and_unknown_fields_ignored() -> None:
    text = "max_age: 86400\nmx: mx.example.org\nfuture_field: anything\nmode: testing\nversion: STSv1\n"
    assert parse_policy(text) == ("testing", ("mx.example.org",), 86400)


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n") == ("none", (), 86400)


def test_whitespace_around_colon() -> None:
    assert parse_policy("version:STSv1\nmode :\tenforce\nmx:   a.example\nmax_age: 1 \n")[0] == "enforce"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "mode: enforce\nmx: a.example\nmax_age: 1\n",  # no version
        "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
        "version: STSv1\nmode: block\nmx: a.example\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmax_age: 86400\n",  # enforce without mx
        "version: STSv1\nmode: testing\nmax_age: 86400\n",  # testing without mx
        "version: STSv1\nmode: enforce\nmx: a.example\n",  # no max_age
        "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n",  # > one year
        "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
        "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n",  # 11 digits
        "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1d\n",
        "version: STSv1\nmode: enforce\nmode: none\nmx: a.example\nmax_age: 1\n",  # duplicate
        "version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n",  # two wildcards
        "version: STSv1\nmode: enforce\nmx: a*.example\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: localhost\nmax_age: 1\n",  # not a domain with a dot
        "version: STSv1\nmode: enforce\nmx: -a.example\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx a.example\nmax_age: 1\n",  # no colon
        "version: STSv1\nmode: enforce\nmx: a.example b.example\nmax_age: 1\n",
        "<html><body>not a policy</body></html>",
    ],
)
def test_bad_policies_rejected(text: str) -> None:
    with pytest.raises(StsError):
        parse_policy(text)


def test_max_age_limit_accepted() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 31557600\n")[2] == 31557600


@given(st.text(max_size=300))
def test_parser_never_crashes(text: str) -> None:
    try:
        mode, mx, max_age = parse_policy(text)
    except StsError:
        return
    assert mode in ("enforce", "testing", "none")
    assert 0 <= max_age <= 31557600


# RFC 8461 §3.1 TXT records


def test_txt_rfc_example() -> None:
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"


def test_txt_without_trailing_semicolon_and_with_extension() -> None:
    assert parse_txt(["v=STSv1;id=abc123; ext=x"]) == "abc123"


def test_txt_other_records_discarded() -> None:
    assert parse_txt(["v=spf1 -all", "v=STSv1; id=1"]) == "1"


@pytest.mark.parametrize(
    "records",
    [
        [],
        ["v=spf1 -all"],
        ["v=STSv1; id=1", "v=STSv1; id=2"],  # not exactly one
        ["v=STSv1;"],  # no id
        ["v=STSv1; id="],
        ["v=STSv1; id=" + "a" * 33],  # id longer than 32
        ["v=STSv1; id=a-b"],  # id is alphanumeric only
        ["v=STSv1; id=1; id=2"],
        ["v=STSv1; junk"],
        ["v=STSv10; id=1"],
    ],
)
def test_bad_txt_rejected(records: list[str]) -> None:
    with pytest.raises(StsError):
        parse_txt(records)


# RFC 8461 §4.1 MX matching


@pytest.mark.parametrize(
    ("pattern", "host", "ok"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.Example.COM.", True),  # case, trailing dot
        ("mail.example.com", "mail2.example.com", False),
        ("*.example.net", "mx1.example.net", True),
        ("*.example.net", "example.net", False),  # the wildcard needs a label
        ("*.example.net", "a.b.example.net", False),  # exactly one label
        ("*.example.net", ".example.net", False),
        ("*.example.net", "mx1.example.net.evil", False),
    ],
)
def test_mx_patterns(pattern: str, host: str, ok: bool) -> None:
    assert mx_matches(pattern, host) is ok


def test_policy_matches_any_pattern_and_expires() -> None:
    policy = StsPolicy("1", "enforce", ("mail.example.com", "*.example.net"), 100, 1000.0)
    assert policy.matches("x.example.net") and policy.matches("mail.example.com")
    assert not policy.matches("other.example.com")
    assert policy.expires_at == 1100.0
