"""Seeded in-memory simulations of the cluster protocols on trio's MockClock (tests.harness)."""
