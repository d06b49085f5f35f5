"""A TCP relay a test can black out: the network between one hospital and the coordinator.

It forwards every connection on its own loopback port to a target port, byte for byte (TLS passes
through untouched). `blackout(seconds)` is a network outage as a hospital sees it: every open
connection is cut, nothing listens (new connections are refused) for `seconds`, then it accepts again
on the same port. `go_dark()` and `resume()` do the same in two steps.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class BlackoutRelay:
    """Forward 127.0.0.1:<port> to 127.0.0.1:<target_port> until blacked out or stopped."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0  # connections relayed since start
        self.severed = 0  # sockets of open connections cut by blackouts (two per connection)
        self.blackouts = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._stopped = False

    def start(self) -> int:
        """Listen (on a free port the first time, the same port after a blackout); returns the port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accepting = threading.Thread(target=self._accept_loop, args=(listener,), daemon=True)
        self._accepting.start()
        return self.port

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                local, _ = listener.accept()
            except OSError:
                return  # the listener was closed: blackout or stop
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                local.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self.accepted += 1
                self._open.update((local, upstream))
            for source, sink in ((local, upstream), (upstream, local)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            # One direction ended: end the connection both ways, as a real network path would.
            for sock in (source, sink):
                self._close(sock)

    def _close(self, sock: socket.socket) -> bool:
        with self._lock:
            was_open = sock in self._open
            self._open.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
        return was_open

    def _go_dark(self) -> int:
        """Stop listening and cut every open connection; returns how many sockets were cut."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        if self._accepting is not None:
            self._accepting.join(timeout=5)
        with self._lock:
            victims = list(self._open)
        return sum(self._close(sock) for sock in victims)

    def go_dark(self) -> None:
        """Cut every open connection and refuse new ones until `resume()`."""
        self.severed += self._go_dark()
        self.blackouts += 1

    def resume(self) -> None:
        """Accept connections again, on the same port."""
        if not self._stopped:
            self.start()

    def blackout(self, seconds: float) -> None:
        """Cut every connection, refuse new ones for `seconds`, then accept again (blocks meanwhile)."""
        self.go_dark()
        time.sleep(seconds)
        self.resume()

    def stop(self) -> None:
        self._stopped = True
        self._go_dark()
