"""Fixtures for cluster tests: a TLS+auth etcd cluster and a running 3-node cluster."""

from tests.support.cluster import cluster, etcd_cluster  # noqa: F401  (fixtures)
