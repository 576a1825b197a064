"""A loopback TCP proxy that can cut a client off from its server (a network partition) and heal.

One worker talks to Redis through it; everything else talks to Redis directly::

    proxy = ChaosProxy(redis_port).start()
    url = proxy.url("redis", db=0)          # redis://127.0.0.1:<proxy port>/0
    proxy.cut()                             # drop every connection, blackhole new ones
    proxy.heal()                            # forward again

``cut()`` closes every forwarded connection (the client sees a reset/EOF) and then, by default,
*blackholes* new ones: they are accepted but nothing is ever forwarded or answered, so the
client's commands hang until its socket timeout, as in a real partition. ``cut(new="refuse")``
resets new connections at once instead. ``heal()`` closes the blackholed connections (their
clients reconnect) and forwards again. Only 127.0.0.1 is ever used.
"""

import contextlib
import socket
import struct
import threading
import time

LOOPBACK = "127.0.0.1"


def _close(sock: socket.socket, reset: bool = False) -> None:
    # shutdown() wakes a pump thread blocked in recv() on this socket; close() alone does not.
    with contextlib.suppress(OSError):
        if reset:  # RST instead of FIN on close
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RD)
        else:
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class ChaosProxy:
    """Forward ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``, with :meth:`cut` and
    :meth:`heal`."""

    def __init__(self, target_port: int, *, connect_timeout: float = 2.0) -> None:
        self.target_port = target_port
        self.connect_timeout = connect_timeout
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(128)
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._mode = "forward"  # forward | blackhole | refuse
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="chaos-proxy", daemon=True)
        #: (time.time(), what) for every cut and heal, for the test's report.
        self.events: list[tuple[float, str]] = []
        self.accepted = 0
        self.blackholed = 0

    # -- control -------------------------------------------------------------------------
    def start(self) -> "ChaosProxy":
        """Start accepting connections."""
        self._thread.start()
        return self

    def url(self, scheme: str = "redis", db: int = 0) -> str:
        """``<scheme>://127.0.0.1:<proxy port>/<db>``."""
        return f"{scheme}://{LOOPBACK}:{self.port}/{db}"

    @property
    def is_cut(self) -> bool:
        """Whether the proxy currently forwards nothing."""
        return self._mode != "forward"

    def cut(self, new: str = "blackhole") -> None:
        """Drop every forwarded connection; ``new`` connections are then blackholed (accepted,
        never answered) or refused (reset at once)."""
        if new not in ("blackhole", "refuse"):
            raise ValueError(f"new must be 'blackhole' or 'refuse', not {new!r}")
        with self._lock:
            self._mode = new
            pairs, self._pairs = self._pairs, []
            self.events.append((time.time(), f"cut ({new})"))
        for client, upstream in pairs:
            _close(client, reset=True)
            _close(upstream)

    def heal(self) -> None:
        """Forward again; connections blackholed meanwhile are closed so their clients
        reconnect."""
        with self._lock:
            self._mode = "forward"
            held, self._held = self._held, []
            self.events.append((time.time(), "heal"))
        for sock in held:
            _close(sock, reset=True)

    def close(self) -> None:
        """Stop the proxy and close every connection."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        _close(self._listener)
        with self._lock:
            pairs, self._pairs = self._pairs, []
            held, self._held = self._held, []
        for client, upstream in pairs:
            _close(client)
            _close(upstream)
        for sock in held:
            _close(sock)

    def __enter__(self) -> "ChaosProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            client.settimeout(None)
            self.accepted += 1
            with self._lock:
                mode = self._mode
                if mode == "blackhole":
                    self._held.append(client)
                    self.blackholed += 1
            if mode == "refuse":
                _close(client, reset=True)
            elif mode == "forward":
                self._forward(client)

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(
                (LOOPBACK, self.target_port), timeout=self.connect_timeout
            )
        except OSError:
            _close(client, reset=True)
            return
        upstream.settimeout(None)
        with self._lock:
            if self._mode != "forward":  # cut while connecting
                _close(client, reset=True)
                _close(upstream)
                return
            self._pairs.append((client, upstream))
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(
                target=self._pump, args=(source, sink, client, upstream), daemon=True
            ).start()

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        client: socket.socket,
        upstream: socket.socket,
    ) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            pair = (client, upstream)
            if pair in self._pairs:
                self._pairs.remove(pair)
        _close(client)
        _close(upstream)
