"""Test harness: in-memory simulations for the tests and the benchmarks, never for the daemon.

- :mod:`.simnet`: the simulated network (:class:`~.simnet.SimWorld`, one
  :class:`~.simnet.SimNetwork` per peer) with seeded loss, delay, partitions and crashes;
- :mod:`.swim_cluster`: SWIM membership peers on it;
- :mod:`.plumtree_cluster`: Plumtree broadcast peers on it, membership given;
- :mod:`.replication_cluster`: Plumtree and anti-entropy together, as the daemon wires them.

Outside ``drekifs/`` so that it does not ship in the product package. The benchmarks import it
as ``tests.harness`` with the repository root on ``sys.path``.
"""
