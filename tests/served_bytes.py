"""moto's S3 server in this process, counting the bytes it serves for one key: what a bill would say.

Used by the ranged-read tests (tests/test_s3.py) and benchmarks/ranged_reads.py and manifest_lookup.py, which add
`tests/` to their path.
"""
from __future__ import annotations

import logging
import socket
import threading
import time


class ServedBytes:
    """WSGI middleware in front of moto's app: the body bytes and requests the server answers for paths ending in
    `suffix` (settable: a string or a tuple of them; None counts nothing). `latency` (s, settable) holds every request that long before it is
    answered, as a distant server's round trip does; `most_in_flight` is the most requests it held at once."""

    def __init__(self, app, suffix: str | None = None):
        self.app, self.suffix = app, suffix
        self.bytes = self.requests = 0
        self.latency = 0.0
        self.in_flight = self.most_in_flight = 0
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        if self.latency:
            with self._lock:
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            time.sleep(self.latency)
            with self._lock:
                self.in_flight -= 1
        counted = self.suffix is not None and environ.get("PATH_INFO", "").endswith(self.suffix)
        for chunk in self.app(environ, start_response):
            if counted:
                with self._lock:
                    self.bytes += len(chunk)
            yield chunk
        if counted:
            with self._lock:
                self.requests += 1

    def take(self) -> tuple[int, int]:
        """(bytes, requests) since the last call."""
        with self._lock:
            out = (self.bytes, self.requests)
            self.bytes = self.requests = 0
        return out


def start_counted_server(suffix: str | None = None) -> tuple[object, ServedBytes, str]:
    """(the started ThreadedMotoServer on 127.0.0.1, its counter, its endpoint URL); stop it with `.stop()`."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    counter = ServedBytes(server._server.app, suffix)  # werkzeug's server calls `self.app` per request
    server._server.app = counter
    return server, counter, f"http://127.0.0.1:{port}"
