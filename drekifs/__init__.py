"""drekifs: a fleet of machines as files.

The world (regions and nodes, from DNS) is mounted with FUSE; see docs/design.md for the contract.
Layout: ``drekifs.world`` (DNS to world model, plain data), ``drekifs.urn`` (names),
``drekifs.fs`` (FUSE requests), ``drekifs.stores`` and ``drekifs.cluster`` (later issues).
"""

__version__ = "0.1.0"
