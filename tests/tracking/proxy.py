"""A TCP proxy in front of a real server that can slow down or hold each HTTP request.

Bytes are forwarded unchanged both ways, one thread per direction per connection. A request
is the first chunk a client sends after the previous answer began; before it is forwarded
it waits ``delay_s`` seconds and, while :attr:`gate` is cleared, until the test sets it
again (:attr:`held` is set once a request waits there). Each request's first line
(``POST /api/2.0/mlflow/runs/log-batch HTTP/1.1``) is kept in :attr:`requests`.
"""

from __future__ import annotations

import socket
import threading
import time


class DelayingProxy:
    def __init__(self, target_port: int, delay_s: float = 0.0) -> None:
        self.target = ("127.0.0.1", target_port)
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests_to(self, path_part: str) -> int:
        with self._lock:
            return sum(path_part in line for line in self.requests)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            answered = threading.Event()  # set: the next chunk from the client begins a request
            answered.set()
            threading.Thread(target=self._forward, args=(client, server, answered, True), daemon=True).start()
            threading.Thread(target=self._forward, args=(server, client, answered, False), daemon=True).start()

    def _forward(self, source: socket.socket, sink: socket.socket, answered: threading.Event, upstream: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if upstream and answered.is_set():
                    answered.clear()
                    with self._lock:
                        self.requests.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
                    if not self.gate.is_set():
                        self.held.set()
                        self.gate.wait()
                    if self.delay_s:
                        time.sleep(self.delay_s)  # the latency this proxy exists to add
                elif not upstream:
                    answered.set()  # before the bytes reach the client, which may then ask again
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """Stop accepting and cut every connection (to the client, a server that went away)."""
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        self._listener.close()
        self.gate.set()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def __enter__(self) -> DelayingProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
