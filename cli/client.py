"""The HTTP session with one picstream server: the key on every request, RFC 9457 problems
turned into `ApiError`, and a network failure into `NetworkError` naming the URL.

The key is sent only in the Authorization header and appears in no message, log or
exception text this module makes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from importlib import metadata
from typing import Any

import httpx2

PROBLEM_PREFIX = "urn:picstream:problem:"
# Waits (s) before each retry after a failure; callers reset the count on progress.
BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0)
MAX_RETRY_AFTER = 30.0
# 423: a tus upload still locked by a request the server has not seen end; 503: busy (a
# slot budget, with Retry-After) or a store/queue outage; 408: our body stalled.
_TRANSIENT_STATUS = frozenset({408, 423, 429, 500, 502, 503, 504})


def _version() -> str:
    try:
        return metadata.version("picstream")
    except metadata.PackageNotFoundError:
        return "dev"


class ApiError(Exception):
    """The server refused: its status, and the problem's title, detail and type slug."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        slug: str = "",
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.slug = slug
        self.retry_after = retry_after
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """One line for a person: title, detail, status (and what to do about a bad key)."""
        text = f"{self.title}: {self.detail}" if self.detail else self.title
        text += f" (HTTP {self.status})"
        if self.slug == "unauthorized":
            text += "; check the key (`picstream login`, or PICSTREAM_KEY)"
        return text

    @property
    def reason(self) -> str:
        """The short form for a table cell: the detail, else the title."""
        return self.detail or self.title


class Interrupted(Exception):
    """The user asked to stop (Ctrl-C); what was under way can be resumed later."""


class NetworkError(Exception):
    """The server could not be reached, or the connection failed mid-request."""

    def __init__(self, url: str, exc: httpx2.TransportError | str) -> None:
        reason = (str(exc) or type(exc).__name__) if not isinstance(exc, str) else exc
        if isinstance(exc, httpx2.ConnectError | httpx2.ConnectTimeout):
            text = f"could not reach {url} ({reason})"
        else:
            text = f"the connection to {url} failed ({reason})"
        super().__init__(text)


def transient(exc: ApiError) -> bool:
    """Whether the same request, sent again later, can succeed."""
    return exc.status in _TRANSIENT_STATUS or exc.slug == "offset-mismatch"


def problem_of(resp: httpx2.Response) -> ApiError:
    """The ApiError an error response stands for (its body must have been read)."""
    body: Any = {}
    if "json" in resp.headers.get("content-type", ""):
        with contextlib.suppress(ValueError):
            body = resp.json()
    if not isinstance(body, dict):
        body = {}
    title = body.get("title") or resp.reason_phrase or "error"
    detail = body.get("detail") if isinstance(body.get("detail"), str) else None
    slug = str(body.get("type", "")).removeprefix(PROBLEM_PREFIX)
    return ApiError(resp.status_code, str(title), detail, slug, _retry_after(resp))


def _retry_after(resp: httpx2.Response) -> float | None:
    value = resp.headers.get("retry-after", "")
    return float(value) if value.strip().isdigit() else None


class Api:
    """One server, one key, one connection pool (thread-safe: uploads share it)."""

    def __init__(self, url: str, key: str, *, connections: int = 8) -> None:
        self.url = url
        self.http = httpx2.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {key}", "User-Agent": f"picstream/{_version()}"},
            # Reads wait for the last PATCH's commit (which may re-read the upload to hash
            # it) and for SSE heartbeats; a body that cannot be sent for a minute is retried.
            timeout=httpx2.Timeout(120, connect=10, write=60),
            limits=httpx2.Limits(
                max_connections=connections, max_keepalive_connections=connections
            ),
        )

    def close(self) -> None:
        self.http.close()

    def absolute(self, location: str) -> str:
        """A `Location` (a path such as /v1/tus/abc, or a URL) as a full URL."""
        return str(self.http.base_url.join(location))

    def send(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        content: Any = None,
        json_body: Any = None,
    ) -> httpx2.Response:
        """The response whatever its status; httpx2.TransportError on a network failure
        (for callers that retry, such as the tus client)."""
        body = json.dumps(json_body).encode() if json_body is not None else content
        hdrs = dict(headers or {})
        if json_body is not None:
            hdrs["Content-Type"] = "application/json"
        return self.http.request(method, path, headers=hdrs, params=params, content=body)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx2.Response:
        """A 2xx response, else ApiError; NetworkError when the server cannot be reached."""
        try:
            resp = self.send(method, path, **kwargs)
        except httpx2.TransportError as exc:
            raise NetworkError(self.url, exc) from None
        if resp.status_code >= 400:
            raise problem_of(resp)
        return resp

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON body of a 2xx response (None when it has none, e.g. 204)."""
        resp = self.call(method, path, **kwargs)
        return resp.json() if resp.content else None

    @contextlib.contextmanager
    def stream(
        self, method: str, path: str, headers: Mapping[str, str] | None = None
    ) -> Iterator[httpx2.Response]:
        """A response whose body is read as it arrives (downloads, events); ApiError for an
        error status, NetworkError when the server cannot be reached."""
        try:
            with self.http.stream(method, path, headers=headers) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise problem_of(resp)
                yield resp
        except httpx2.TransportError as exc:
            raise NetworkError(self.url, exc) from None
