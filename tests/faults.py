"""Fault injection for tests: TCP forwarders that play an outage (`Outage`) or a stall
(`Stall`) of the server behind them; both are `Forwarder`s and context managers.

Clients are pointed at the forwarder instead of the real server. While `down`, every new
connection is accepted and closed at once (what a crashed or restarting server looks like to
a client); while up, bytes are pumped both ways. Only new connections see a change.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from typing import Self


class Forwarder:
    """A listener on a free loopback port for clients of the server on `target_port`: each
    accepted connection goes to `_serve`; `close()` (or leaving a `with` block) closes the
    listener and every connection opened through `_connect`. Subclasses set their own
    state before calling `__init__`, which starts accepting."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._open: list[socket.socket] = []
        self._closed = False
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            self._closed = True
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            self._serve(client)

    def _serve(self, client: socket.socket) -> None:
        raise NotImplementedError

    def _connect(self, client: socket.socket) -> socket.socket | None:
        """A connection to the target for `client`, both closed by `close()`; None (both
        closed now) once the forwarder is closed."""
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        with self._lock:
            if self._closed:
                client.close()
                upstream.close()
                return None
            self._open += [client, upstream]
        return upstream


class Outage(Forwarder):
    def __init__(self, target_port: int, down: bool = True) -> None:
        self.down = down
        self.connections = 0  # accepted while up or down: proves clients tried
        super().__init__(target_port)

    def cut(self) -> None:
        """Go down and break every open connection too (pooled clients notice at once)."""
        self.down = True
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def _serve(self, client: socket.socket) -> None:
        self.connections += 1
        if self.down:
            client.close()
            return
        upstream = self._connect(client)
        if upstream is None:
            return
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(src, dst), daemon=True).start()


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy `src` to `dst` until either ends, then half-close `dst`."""
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class Stall(Forwarder):
    """A TCP forwarder that can hold a connection's bytes on their way to the server.

    - `hold_on(pattern)`: the first client->server chunk containing `pattern` (e.g. b"EXEC"
      of a Redis transaction) and everything after it on that connection are kept back;
      `held` is set then, `client_gone` once that client closes its end (it gave up).
      `release()` sends the kept bytes on; `answered` is set when the server replies.
    - `pause()` / `resume()`: every connection stops forwarding (a stalled server).
    Other connections pass untouched, so a client can reconnect while one is held.
    """

    def __init__(self, target_port: int) -> None:
        self.pattern: bytes | None = None
        self.held = threading.Event()
        self.client_gone = threading.Event()
        self.answered = threading.Event()
        self.forwarded = threading.Event()  # some client bytes went through while paused off
        self._release = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._holding: socket.socket | None = None
        self.received = 0  # client bytes seen (while paused too)
        super().__init__(target_port)

    def hold_on(self, pattern: bytes) -> None:
        self.pattern = pattern

    def release(self) -> None:
        self._release.set()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def close(self) -> None:
        self._release.set()  # no thread stays blocked on a held or paused connection
        self._running.set()
        super().close()

    def _serve(self, client: socket.socket) -> None:
        upstream = self._connect(client)
        if upstream is None:
            return
        threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
        threading.Thread(target=self._down, args=(upstream, client), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while chunk := client.recv(65536):
                self.received += len(chunk)
                if self.pattern and self.pattern in chunk and self._claim(client):
                    self._hold(client, upstream, chunk)
                    return
                self._running.wait()
                upstream.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)

    def _claim(self, client: socket.socket) -> bool:
        with self._lock:
            if self._holding is not None:
                return False
            self._holding = client
        self.held.set()
        return True

    def _hold(self, client: socket.socket, upstream: socket.socket, kept: bytes) -> None:
        """Keep the bytes until release(), noting when the client gives up; then pass
        everything on."""
        closed = False
        while not self._release.is_set():
            if closed:
                self._release.wait()
                break
            ready, _, _ = select.select([client], [], [], 0.05)
            if ready:
                chunk = client.recv(65536)
                kept += chunk
                if not chunk:
                    closed = True
                    self.client_gone.set()
        upstream.sendall(kept)
        while not closed and (chunk := client.recv(65536)):
            upstream.sendall(chunk)

    def _down(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while chunk := upstream.recv(65536):
                if client is self._holding:
                    self.answered.set()
                self._running.wait()
                with contextlib.suppress(OSError):
                    client.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)
