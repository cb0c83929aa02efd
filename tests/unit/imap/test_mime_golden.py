"""Golden corpus: ENVELOPE and BODY/BODYSTRUCTURE of tests/corpus/*.eml (RFC 3501 §7.4.2).

Each case is NAME.eml plus NAME.json holding the expected wire strings,
written from RFC 3501 §7.4.2 and checked against Dovecot by
tests/interop/test_imap_dovecot_differential.py (divergences: docs/mime.md).  Expected strings are UTF-8; literals appear as "{n}\\r\\n...".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.imap.mime import bodystructure, envelope
from storage.mime import parse_metadata

CORPUS = Path(__file__).resolve().parents[2] / "corpus"
CASES = sorted(p.stem for p in CORPUS.glob("*.eml"))
MIN_CASES = 50


def _load(name: str) -> tuple[bytes, dict]:
    raw = (CORPUS / f"{name}.eml").read_bytes()
    expected = json.loads((CORPUS / f"{name}.json").read_text(encoding="utf-8"))
    return raw, expected


def test_corpus_has_enough_cases() -> None:
    # A golden corpus that silently shrank would pass vacuously.
    assert len(CASES) >= MIN_CASES
    for name in CASES:
        assert (CORPUS / f"{name}.json").exists(), name


@pytest.mark.parametrize("name", CASES)
def test_envelope(name: str) -> None:
    raw, expected = _load(name)
    assert envelope(parse_metadata(raw)) == expected["envelope"].encode("utf-8")


@pytest.mark.parametrize("name", CASES)
def test_bodystructure(name: str) -> None:
    raw, expected = _load(name)
    assert bodystructure(parse_metadata(raw), True) == expected["bodystructure"].encode("utf-8")


@pytest.mark.parametrize("name", [n for n in CASES if "body" in _load(n)[1]])
def test_body(name: str) -> None:
    raw, expected = _load(name)
    assert bodystructure(parse_metadata(raw), False) == expected["body"].encode("utf-8")


@pytest.mark.parametrize("name", CASES)
def test_metadata_is_json_round_trip_stable(name: str) -> None:
    # Stored as JSON by the storage layer: encoding must not change after a round trip.
    raw, _ = _load(name)
    meta = parse_metadata(raw)
    again = json.loads(json.dumps(meta))
    assert again == meta
    assert envelope(again) == envelope(meta)
    assert bodystructure(again, True) == bodystructure(meta, True)


def test_golden_ran_every_case(request: pytest.FixtureRequest) -> None:
    ran = [
        item
        for item in request.session.items
        if item.originalname == "test_bodystructure"
        and item.module is not None
        and item.module.__name__.endswith("test_mime_golden")
    ]
    assert len(ran) >= MIN_CASES
