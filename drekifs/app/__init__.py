"""The app shell: the ``drekifs`` command and the daemon it starts.

- ``cli``: the argparse commands; ``options``: the option values both it and ``config`` parse;
  ``config``: the mount configuration file;
- ``daemon``: the wiring of everything (world watcher, stores, peer, namespace, FUSE operations);
- ``service``: the daemon as a process (fork, readiness, sd_notify, logging, exit reports);
- ``mounts``: this machine's mount table (find, stale, unmount);
- ``control``: the control socket behind ``drekifs get/put/rm/ls``.

Nothing outside this package imports it (tests/test_imports.py).
"""
