"""Test helper for tests that start jax.distributed processes themselves: a free coordinator port."""

import socket


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released; the caller's coordinator binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
