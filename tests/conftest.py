"""Shared fixtures: a real etcd, and real postroom nodes on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.etcd import etcd_server  # noqa: F401  (fixture)
from tests.support.node import NodeProcess


@pytest.fixture(scope="module")
def postroom_node(tmp_path_factory) -> Iterator[NodeProcess]:
    """A running node with domain example.test and users alice and bob."""
    node = NodeProcess(tmp_path_factory.mktemp("node"))
    node.start()
    try:
        node.provision()
        yield node
    finally:
        node.kill() if node.stop() is None else None
        print(node.log_tail(20))


@pytest.fixture
def node_factory(tmp_path_factory) -> Iterator:
    """node_factory(**overrides) starts another provisioned node."""
    started: list[NodeProcess] = []

    def make(provision: bool = True, **overrides) -> NodeProcess:
        node = NodeProcess(tmp_path_factory.mktemp("node"), overrides)
        started.append(node)
        node.start()
        if provision:
            node.provision()
        return node

    yield make
    for node in started:
        node.stop()
