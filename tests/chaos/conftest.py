"""Fixtures for the chaos tests: one 3-node cluster shared by the cluster modules."""

from tests.support.cluster import chaos_cluster  # noqa: F401  (fixture)
