"""A small HTTP client for tests against a real server (http.client and raw sockets)."""

from __future__ import annotations

import contextlib
import http.client
import json
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def multipart(
    data: bytes | Iterable[bytes],
    filename: str = "photo.jpg",
    field: str = "file",
    content_type: str = "image/jpeg",
    boundary: str | None = None,
) -> tuple[list[bytes], str]:
    """A multipart/form-data envelope around `data` as pieces, and its Content-Type."""
    boundary = boundary or "----picstream" + secrets.token_hex(8)
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
        f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
    ).encode()
    pieces = [head, *([data] if isinstance(data, bytes) else data)]
    pieces.append(f"\r\n--{boundary}--\r\n".encode())
    return pieces, f"multipart/form-data; boundary={boundary}"


class Api:
    def __init__(self, host: str, port: int, key: str | None) -> None:
        self.host = host
        self.port = port
        self.key = key

    def request(
        self,
        method: str,
        path: str,
        body: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        *,
        chunked: bool = False,
        key: str | None = "default",
        timeout: float = 120,
    ) -> Response:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        hdrs = dict(headers or {})
        key = self.key if key == "default" else key
        if key:
            hdrs["Authorization"] = f"Bearer {key}"
        if chunked:
            hdrs["Transfer-Encoding"] = "chunked"
        elif body is not None and not isinstance(body, bytes) and "Content-Length" not in hdrs:
            pieces = list(body)
            hdrs["Content-Length"] = str(sum(len(p) for p in pieces))
            body = pieces
        # The server may answer early and close; then read what it said.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request(method, path, body=body, headers=hdrs, encode_chunked=chunked)
        try:
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def upload(
        self,
        body: bytes | Iterable[bytes],
        image_id: str | None = None,
        *,
        chunked: bool = False,
        headers: dict[str, str] | None = None,
        key: str | None = "default",
        query: str = "",
    ) -> Response:
        path = f"/v1/images/{image_id}" if image_id else "/v1/images"
        hdrs = {"Content-Type": "application/octet-stream", **(headers or {})}
        return self.request(
            "PUT" if image_id else "POST", path + query, body, hdrs, chunked=chunked, key=key
        )

    def raw(self, payload: bytes, *, wait: float = 10) -> tuple[socket.socket, bytes]:
        """Send raw bytes, then read what the server answers within `wait` s without sending
        more. Returns the (still open) socket and the bytes read."""
        sock = socket.create_connection((self.host, self.port), timeout=wait)
        sock.sendall(payload)
        received = b""
        try:
            while b"\r\n\r\n" not in received:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
            head, _, rest = received.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(rest) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
            received = head + b"\r\n\r\n" + rest
        except TimeoutError:
            pass
        return sock, received

    def headers_for(self, method: str, path: str, extra: str = "") -> bytes:
        return (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {self.key}\r\n{extra}\r\n"
        ).encode()


@dataclass
class Event:
    id: str | None
    event: str
    data: Any


class EventReader:
    """A Server-Sent Events stream read through http.client (which undoes the chunking)."""

    def __init__(
        self, api: Api, path: str, last_event_id: str | None = None, timeout: float = 60
    ) -> None:
        self.conn = http.client.HTTPConnection(api.host, api.port, timeout=timeout)
        headers = {"Authorization": f"Bearer {api.key}", "Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", path, headers=headers)
        self.response = self.conn.getresponse()
        self.comments = 0

    def next(self) -> Event | None:
        """The next event, or None when the server ended the stream."""
        fields: dict[str, str] = {}
        while True:
            line = self.response.readline()
            if not line:
                return None
            text = line.decode().rstrip("\r\n")
            if text == "":
                if "event" in fields or "data" in fields:
                    data = fields.get("data", "")
                    return Event(
                        fields.get("id"),
                        fields.get("event", "message"),
                        json.loads(data) if data.startswith("{") else data,
                    )
                continue
            if text.startswith(":"):
                self.comments += 1
                continue
            name, _, value = text.partition(":")
            value = value.removeprefix(" ")
            fields[name] = fields[name] + "\n" + value if name in fields else value

    def close(self) -> None:
        self.conn.close()
