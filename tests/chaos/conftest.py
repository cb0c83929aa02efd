"""Fixtures for the chaos tests: the failover modules' shared cluster and the
membership test's own (it grows and shrinks it)."""

from tests.support.cluster import chaos_cluster, membership_cluster  # noqa: F401  (fixtures)
