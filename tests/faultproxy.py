"""A TCP proxy in front of the S3 server that can make it misbehave the way a real one does under faults.

It forwards bytes untouched (so signed requests, aws-chunked uploads and checksums pass through as they are:
an HTTP-level proxy that re-frames bodies breaks them). `fault(mode)` starts a fault:

- `"500"`: every new connection reads the request head and gets `500 InternalError` (S3's XML) and is closed;
- `"restart"`: live connections are cut mid-request and new ones are refused with a reset, as while the
  server process restarts.

Connections open when a fault starts are cut, so requests in flight see it too. `heal()` ends it. The counts of
forwarded and faulted (refused, answered 500 or cut) connections let a test show that the fault hit the job's traffic.

Written by hand: moto's server has no fault hooks, and no well-kept library does this for a test in a few lines.
"""
from __future__ import annotations

import socket
import struct
import threading

_ERROR = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InternalError</Code>"
          b"<Message>We encountered an internal error. Please try again.</Message></Error>")
_RESPONSE_500 = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_ERROR)) + _ERROR


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dying server's kernel does. `shutdown(SHUT_RD)` first wakes the pump
    thread blocked reading it: a plain close() leaves the socket open while another thread is in recv() on it
    (the kernel keeps it for the call), so a "cut" connection went on, neither forwarded nor reset."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()


class FaultProxy:
    def __init__(self, upstream: str):
        host, port = upstream.split("://", 1)[-1].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.mode: str | None = None
        self.forwarded = 0
        self.faulted = 0
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def fault(self, mode: str) -> None:
        assert mode in ("500", "restart")
        with self._lock:
            self.mode = mode
            live, self._live = self._live, set()
            self.faulted += len(live) // 2  # each cut connection is a client socket and an upstream one
        for s in live:
            _reset(s)

    def heal(self) -> None:
        self.mode = None

    def close(self) -> None:
        self._server.close()
        self.fault("restart")

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        mode = self.mode
        if mode is not None:
            self.faulted += 1
            if mode == "500":
                try:
                    client.settimeout(5)
                    client.recv(65536)  # the request head (and perhaps part of a body we never read)
                    client.sendall(_RESPONSE_500)
                except OSError:
                    pass
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        with self._lock:
            self._live |= {client, upstream}
        self.forwarded += 1
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                ours = {src, dst} & self._live  # the ones a fault cut are its to close, with a reset
                self._live -= ours
            for s in ours:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
