"""Reading a server's answers off a raw socket, parsed by h11 (so an answer written into
another one, or a framing error, fails the test that reads it)."""

from __future__ import annotations

import socket
import time

import h11
import pytest


def responses(sock: socket.socket, *requests: tuple[str, str]) -> list[tuple[int, bytes, float]]:
    """Read the answers to ``requests`` ((method, path), in order) off ``sock`` until the server
    closes it, parsed by h11 (so a response written into another would fail here):
    ``(status, body, seconds until its end)`` each."""
    conn = h11.Connection(h11.CLIENT)
    out: list[tuple[int, bytes, float]] = []
    t0 = time.monotonic()
    for method, path in requests:
        conn.send(h11.Request(method=method, target=path, headers=[("host", "x"), ("content-length", "0")]))
        conn.send(h11.EndOfMessage())
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                pytest.fail(f"unexpected {event!r} after {out}")
        out.append((status, body, time.monotonic() - t0))
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            break
        conn.start_next_cycle()
    assert sock.recv(65536) == b"", "the server did not close the connection"
    return out
