"""A flood of TCP connections that never finish the handshake, as a process of its own:

    python -m tests.mounted.flood HOST:PORT STATUS_FILE SOURCE=COUNT...

holds COUNT connections to HOST:PORT from each SOURCE address (bound, port 0), reads and ignores
what the server sends, never sends a byte, and opens a new one whenever one is closed or fails
(at most MAX_OPENS_PER_SECOND, so that a server that refuses at once is not answered by a busy
loop that would starve the machine of CPU). Every STATUS_INTERVAL it writes to STATUS_FILE (a
JSON object, replaced atomically): connections open and being opened, and how many were opened
in all. Runs until killed; bounded by RUN_FOR seconds in any case.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import selectors
import socket
import sys
import time

MAX_OPENS_PER_SECOND = 5000
STATUS_INTERVAL = 0.2
RUN_FOR = 300.0


def main(argv: list[str]) -> int:
    host, port = argv[0].rsplit(":", 1)
    target = (host, int(port))
    status_path = argv[1]
    wanted = [(src, int(n)) for src, n in (a.split("=") for a in argv[2:])]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    sel = selectors.DefaultSelector()
    state: dict[socket.socket, str] = {}  # socket -> "connecting" | "open"
    source_of: dict[socket.socket, str] = {}
    to_open = [src for src, n in wanted for _ in range(n)]
    opened = 0
    budget, budget_at = float(MAX_OPENS_PER_SECOND), time.monotonic()

    def drop(s: socket.socket) -> None:
        sel.unregister(s)
        del state[s]
        to_open.append(source_of.pop(s))
        s.close()

    started = last_status = time.monotonic()
    while time.monotonic() - started < RUN_FOR:
        now = time.monotonic()
        budget = min(MAX_OPENS_PER_SECOND, budget + (now - budget_at) * MAX_OPENS_PER_SECOND)
        budget_at = now
        while to_open and budget >= 1:
            src = to_open.pop()
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.bind((src, 0))
                err = s.connect_ex(target)
            except OSError as e:
                err = e.errno
            budget -= 1
            if err not in (0, errno.EINPROGRESS):
                s.close()
                to_open.append(src)
                break  # out of ports or descriptors for now: try again later
            opened += 1
            state[s], source_of[s] = "connecting", src
            sel.register(s, selectors.EVENT_WRITE)
        for key, _ in sel.select(timeout=0.01):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            if state[s] == "connecting":
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    drop(s)
                else:
                    state[s] = "open"
                    sel.modify(s, selectors.EVENT_READ)
                continue
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                drop(s)
        if now - last_status >= STATUS_INTERVAL:
            last_status = now
            held = sum(v == "open" for v in state.values())
            status = {"open": held, "connecting": len(state) - held, "opened": opened}
            tmp = status_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(status, f)
            os.replace(tmp, status_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
