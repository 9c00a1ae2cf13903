"""The fault proxy the S3 fault tests stand on: a fault cuts the connections open through it."""
import socket
import threading

import pytest

from faultproxy import FaultProxy


@pytest.fixture
def echo_server():
    """An upstream on 127.0.0.1 that echoes each connection's bytes back."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn):
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:  # reset by the proxy's fault
                pass

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.mark.parametrize("mode", ["500", "restart"])
def test_a_fault_cuts_a_connection_idle_through_the_proxy(echo_server, mode):
    """A keep-alive connection idle when the fault starts (both pump threads waiting in recv) is reset at once:
    closing a socket another thread reads left it open, so the test's "cut" connections lived on."""
    proxy = FaultProxy(echo_server)
    address = ("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]))
    client = socket.create_connection(address, timeout=5)
    client.sendall(b"ping")
    assert client.recv(4) == b"ping"  # forwarded
    proxy.fault(mode)
    with pytest.raises(ConnectionResetError):
        client.recv(4)
    assert proxy.faulted == 1
    proxy.heal()
    again = socket.create_connection(address, timeout=5)
    again.sendall(b"pong")
    assert again.recv(4) == b"pong"
    proxy.close()
