"""Peers of one world, talking to each other.

Where a request goes, by module:

- ``keyring``: the cluster key ring (XChaCha20-Poly1305, rotation);
- ``net``: the Network interface every protocol talks through (real or simulated);
- ``transport`` (with ``frames``, ``rpcclient``, ``rpcserver``, ``outbox``, ``replay``,
  ``limits``, ``endpoint``): sealed TCP frames for calls, UDP datagrams for probes;
- ``swim/``: membership and failure detection (SWIM with Lifeguard);
- ``storerpc``: other nodes' local stores, served by their owner (``store.*`` calls);
- ``plumtree/``: epidemic broadcast of global writes; ``antientropy/``: hash-tree repair;
- ``replication``: the global store replicated with both;
- ``peer``: all of it put together for the daemon.

The in-memory simulations on trio's MockClock are test harness: ``tests/harness/``.
"""
