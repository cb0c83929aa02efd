"""The packages import from this repository, never from PyPI namesakes.

`node`, `cluster` and `storage` are also names of unrelated PyPI packages.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["node", "cluster", "storage"])
def test_package_resolves_inside_repository(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().parent == REPO / name


def test_top_level_layout() -> None:
    for entry in ("cluster", "node", "storage", "ansible", "tests", "docs", "pyproject.toml"):
        assert (REPO / entry).exists(), entry


def test_only_cluster_etcd_imports_an_etcd_client() -> None:
    offenders = []
    for path in list((REPO / "node").rglob("*.py")) + list((REPO / "cluster").rglob("*.py")) + list(
        (REPO / "storage").rglob("*.py")
    ):
        text = path.read_text()
        if ("import etcd3" in text or "from etcd3" in text) and path != REPO / "cluster" / "etcd.py":
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
