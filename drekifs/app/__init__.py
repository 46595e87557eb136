"""The app shell: the ``drekifs`` command (``cli``, ``config``), the daemon (``daemon``) and
its control socket (``control``)."""
