"""Configuration: defaults, type checks, unknown keys named (node/config.py)."""

from __future__ import annotations

import pytest

from node.config import Config, ConfigError, from_dict, load, parse_listen_address


def test_defaults_are_safe() -> None:
    config = from_dict({})
    assert config == Config()
    assert config.node.allow_plaintext_auth_on_loopback is False
    assert config.storage.fsync is True
    assert config.tls.min_version == "1.2"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"smtp": {"max_recipent": 5}}, "smtp.max_recipent"),
        ({"smpt": {}}, "smpt"),
        ({"smtp": {"max_recipients": "many"}}, "smtp.max_recipients"),
        ({"smtp": {"max_recipients": -1}}, "smtp.max_recipients"),
        ({"node": {"allow_plaintext_auth_on_loopback": 1}}, "node.allow_plaintext_auth_on_loopback"),
        ({"tls": {"cert": "/x.pem"}}, "tls.cert"),
        ({"imap": {"listen": ["localhost"]}}, "imap.listen"),
        ({"node": {"log_level": "loud"}}, "node.log_level"),
    ],
)
def test_bad_settings_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_load_reports_missing_and_invalid_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)


def test_listen_addresses() -> None:
    assert parse_listen_address("0.0.0.0:25") == ("0.0.0.0", 25)
    assert parse_listen_address("[::1]:143") == ("::1", 143)
    with pytest.raises(ConfigError):
        parse_listen_address("::1:143x")


def test_every_setting_is_documented() -> None:
    """docs/configuration.md has a row for every key of every section."""
    import dataclasses
    import typing
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    missing = []
    for section, cls in typing.get_type_hints(Config).items():
        if f"## [{section}]" not in doc:
            missing.append(f"[{section}]")
            continue
        part = doc.split(f"## [{section}]", 1)[1].split("\n## ", 1)[0]
        missing += [
            f"{section}.{f.name}" for f in dataclasses.fields(cls) if f"| `{f.name}` |" not in part
        ]
    assert missing == []


def test_list_and_table_values_are_checked_per_item() -> None:
    from dataclasses import dataclass, field

    from node.config import _build_section

    @dataclass(frozen=True)
    class Section:
        numbers: list[int] = field(default_factory=list)
        routes: dict[str, str] = field(default_factory=dict)

    section = _build_section(Section, "s", {"numbers": [1, 2], "routes": {"a.example": "h:25"}})
    assert section.numbers == [1, 2] and section.routes == {"a.example": "h:25"}
    with pytest.raises(ConfigError, match=r"s\.numbers\[1\]"):
        _build_section(Section, "s", {"numbers": [1, "x"]})
    with pytest.raises(ConfigError, match=r"s\.routes\.a\.example"):
        _build_section(Section, "s", {"routes": {"a.example": 25}})
