"""The client's connection: a byte-counting, shaping TCP relay in front of gRPC, and its options.

gRPC does not tell how many bytes a connection carried, so every client talks to the server
through :class:`Relay`, a TCP relay on 127.0.0.1 inside the client process that forwards both
directions of each connection unchanged and counts the bytes it forwards. What it counts is
everything the client's socket sent and received: the messages, gRPC's 5-byte message prefixes,
HTTP/2 frames (headers, data, window updates, pings, settings), and with TLS the TLS records and
handshake; not TCP/IP headers. A reconnection after a fault is counted too.

The relay is also the link: each direction can have a bandwidth and a one-way latency
(:class:`Link`). A chunk of ``n`` bytes read at time ``t`` leaves the link's queue at
``max(t, previous departure) + n / rate`` and is delivered ``latency`` later, i.e. a serial link
of that rate behind a fixed propagation delay. The relay's own reading and writing is not
limited; backpressure reaches the sender once a few megabytes wait in the queue.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time

import grpc

SERVICE = "adc_jax.net.Split"
_CHUNK = 1 << 16
_QUEUED_CHUNKS = 128  # 8 MiB in flight per direction at most


class Link:
    """One direction of a shaped link: ``mbps`` Mbit/s (0 = unlimited), ``latency_ms`` one way."""

    def __init__(self, mbps: float = 0.0, latency_ms: float = 0.0):
        if mbps < 0 or latency_ms < 0:
            raise ValueError(
                f"A link's rate ({mbps} Mbit/s) and latency ({latency_ms} ms) must be >= 0."
            )
        self.rate = mbps * 1e6 / 8  # bytes per second; 0 = unlimited
        self.latency = latency_ms / 1e3
        self._free = 0.0  # when the link has sent everything queued so far
        self._lock = threading.Lock()
        self.enabled = True

    @property
    def shaped(self) -> bool:
        return self.enabled and (self.rate > 0 or self.latency > 0)

    def deliver_at(self, n: int, now: float) -> float:
        """When ``n`` bytes handed to the link at ``now`` reach the other end."""
        with self._lock:
            start = max(now, self._free)
            self._free = start + (n / self.rate if self.rate > 0 else 0.0)
            return self._free + self.latency

    def seconds(self, n: int) -> float:
        """The time ``n`` bytes take on this link, latency included (0 when unshaped)."""
        return (n / self.rate if self.rate > 0 else 0.0) + self.latency


class Relay:
    """Forwards TCP connections from ``127.0.0.1:port`` to ``target``, counting and shaping.

    ``bytes_up`` counts what the client sent towards the server, ``bytes_down`` what came back.
    Use :meth:`unshaped` to let traffic pass at full speed for a while (evaluation).
    """

    def __init__(self, target: tuple[str, int], up: Link | None = None, down: Link | None = None):
        self.target = target
        self.up, self.down = up or Link(), down or Link()
        self.bytes_up = self.bytes_down = 0
        self.connections = 0
        self._count_lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.5)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True, name="relay-accept")
        self._thread.start()

    def counts(self) -> tuple[int, int]:
        with self._count_lock:
            return self.bytes_up, self.bytes_down

    @contextlib.contextmanager
    def unshaped(self):
        self.up.enabled = self.down.enabled = False
        try:
            yield
        finally:
            self.up.enabled = self.down.enabled = True

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self._listener.close()
        for s in list(self._sockets):
            _close(s)

    # ---- Internals -------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                inner, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                outer = socket.create_connection(self.target, timeout=10)
            except OSError:  # the server is down: the client's gRPC sees a failed connection
                _close(inner)
                continue
            outer.settimeout(None)
            for s in (inner, outer):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets.add(s)
            self.connections += 1
            ends = _Ends(inner, outer, self._sockets)
            self._pump(inner, outer, self.up, "bytes_up", ends)
            self._pump(outer, inner, self.down, "bytes_down", ends)

    def _count(self, counter: str, n: int) -> None:
        with self._count_lock:
            setattr(self, counter, getattr(self, counter) + n)

    def _pump(
        self, src: socket.socket, dst: socket.socket, link: Link, counter: str, ends: _Ends
    ) -> None:
        chunks: queue.Queue = queue.Queue(maxsize=_QUEUED_CHUNKS)

        def read():
            try:
                while True:
                    data = src.recv(_CHUNK)
                    if not data:
                        break
                    self._count(counter, len(data))
                    now = time.monotonic()
                    chunks.put((link.deliver_at(len(data), now) if link.shaped else now, data))
            except OSError:
                pass
            chunks.put((0.0, None))

        def write():
            try:
                while True:
                    when, data = chunks.get()
                    if data is None:  # the sender closed its side: pass the close on
                        dst.shutdown(socket.SHUT_WR)
                        ends.finished()
                        return
                    delay = when - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    dst.sendall(data)
            except OSError:  # a side is gone: drop the connection both ways
                ends.close()

        threading.Thread(target=read, daemon=True, name=f"relay-{counter}-read").start()
        threading.Thread(target=write, daemon=True, name=f"relay-{counter}-write").start()


class _Ends:
    """The two sockets of one relayed connection, closed once both directions are finished."""

    def __init__(self, inner: socket.socket, outer: socket.socket, registry: set):
        self._sockets, self._registry = (inner, outer), registry
        self._open = 2
        self._lock = threading.Lock()

    def finished(self) -> None:
        with self._lock:
            self._open -= 1
            done = self._open == 0
        if done:
            self.close()

    def close(self) -> None:
        for s in self._sockets:
            _close(s)
            self._registry.discard(s)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()


# ---- gRPC options ----------------------------------------------------------------------------


def channel_options(max_receive: int, max_send: int) -> list[tuple[str, int]]:
    """Message size limits sized by the plan, quick reconnection, keepalive."""
    return [
        ("grpc.max_receive_message_length", max_receive),
        ("grpc.max_send_message_length", max_send),
        # gRPC's own reconnection backoff grows to two minutes by default: a restarted server
        # would wait that long for its client.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.keepalive_time_ms", 30000),
        ("grpc.keepalive_timeout_ms", 20000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),  # retries are the client's, with resynchronisation
    ]


def server_options(max_receive: int, max_send: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_receive),
        ("grpc.max_send_message_length", max_send),
        ("grpc.so_reuseport", 0),  # a second server on the same port fails instead of sharing it
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def server_credentials(
    cert: str | None, key: str | None, client_ca: str | None = None
) -> grpc.ServerCredentials | None:
    """TLS with the server's certificate; with ``client_ca``, clients must show a certificate
    signed by it (mutual TLS). None without a certificate (plaintext)."""
    if not cert and not key:
        if client_ca:
            raise ValueError("--tls_client_ca needs the server's own --tls_cert and --tls_key.")
        return None
    if not (cert and key):
        raise ValueError("TLS needs both --tls_cert and --tls_key.")
    return grpc.ssl_server_credentials(
        [(_read(key), _read(cert))],
        root_certificates=_read(client_ca),
        require_client_auth=bool(client_ca),
    )


def channel_credentials(
    ca: str | None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials | None:
    """TLS that trusts ``ca`` (the system's roots when ``ca`` is empty but a client certificate
    is given); ``cert``/``key`` present the client's certificate (mutual TLS)."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ValueError("A client certificate needs both --tls_cert and --tls_key.")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
    )


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) → ``(host, port)``; a clear error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"Address {address!r} must be HOST:PORT, e.g. 127.0.0.1:50051.")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
