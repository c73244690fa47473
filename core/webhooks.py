"""Webhooks: the final record, POSTed to a URL the owner chose, signed, with retries.

A URL comes from the upload (`?callback=`) or from the owner's setting
(`PICSTREAM_WEBHOOKS=owner=url,...`). Only hosts on `PICSTREAM_WEBHOOK_HOSTS` are ever
called — the allow-list is what keeps the service from being pointed at internal networks —
and redirects are not followed. Delivery is an rq job (worker/webhooks.py) queued in the same
transaction as the final status, retried with backoff until the receiver answers 2xx. It has
a queue of its own (PICSTREAM_WEBHOOK_QUEUE), so a slow receiver never waits in front of a
conversion; the job is told its event (`image.ready` or `image.failed`) by name.

The receiver verifies `X-Picstream-Signature: t=<unix time>,v1=<hex>`, where v1 is
HMAC-SHA256 over `"<t>.<body>"` keyed by `PICSTREAM_WEBHOOK_SECRET`, and should refuse old
timestamps (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from ipaddress import IPv6Address
from typing import Literal, get_args
from urllib.parse import SplitResult, urlsplit

from core.errors import InvalidWebhookUrl, WebhookHostNotAllowed
from core.models import ImageRecord

DELIVER = "worker.webhooks.deliver"

Event = Literal["image.ready", "image.failed"]
EVENTS: tuple[Event, ...] = get_args(Event)


def check_url(url: str, allowed_hosts: frozenset[str]) -> str:
    """The URL if it may be called; else InvalidWebhookUrl or WebhookHostNotAllowed, naming
    why not."""
    # SECURITY: an uploader chooses this URL and the worker will POST to it (SSRF).
    parts = _split(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidWebhookUrl("callback must be an absolute http(s) URL")
    if parts.username or parts.password:
        raise InvalidWebhookUrl("callback URLs must not carry credentials")
    if not host_allowed(url, allowed_hosts):
        host, port = _host_port(parts)
        shown = f"{host}:{port}" if port is not None else host
        raise WebhookHostNotAllowed(f"callback host {shown!r} is not on PICSTREAM_WEBHOOK_HOSTS")
    return url


def host_allowed(url: str, allowed_hosts: frozenset[str]) -> bool:
    """Whether the URL's host is on the allow-list, as `host` (any port) or `host:port`.

    The one comparison used at upload, at delivery and when the settings are read. Hosts are
    compared lower-case; an IPv6 address is written in brackets, as in URLs (`[::1]:8080`),
    and compared in its canonical form, so `[0:0::1]` on the list matches `http://[::1]/`.
    InvalidWebhookUrl when the URL's host or port cannot be read (a port above 65535, `host:abc`).
    """
    # SECURITY: exact match on the canonical host (and port): no suffix or wildcard match.
    host, port = _host_port(_split(url))
    listed = {_entry(entry) for entry in allowed_hosts}
    return (host, None) in listed or (port is not None and (host, port) in listed)


def _split(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        _ = parts.port  # parsed lazily: raises ValueError for `:99999`, `:abc`, `:1:80`
    except ValueError:
        raise InvalidWebhookUrl("the URL has an invalid host or port (ports are 1-65535)") from None
    return parts


def _host_port(parts: SplitResult) -> tuple[str, int | None]:
    hostname, port = parts.hostname or "", parts.port
    if port == 0:
        raise InvalidWebhookUrl("the URL has an invalid host or port (ports are 1-65535)")
    try:
        return f"[{IPv6Address(hostname).compressed}]", port
    except ValueError:
        return hostname.lower(), port


def _entry(entry: str) -> tuple[str, int | None] | None:
    """An allow-list entry (`host`, `host:port`, `[v6]`, `[v6]:port`) as (host, port)."""
    try:
        return _host_port(_split(f"//{entry}"))
    except InvalidWebhookUrl:
        return None  # cannot match anything (the settings refuse such entries anyway)


def event_of(record: ImageRecord) -> Event:
    """The event a record's final state announces."""
    if record.status == "processing":
        raise ValueError(f"image {record.id!r} has no final state yet")
    return "image.ready" if record.status == "ready" else "image.failed"


def payload(record: ImageRecord) -> str:
    return json.dumps({"type": event_of(record), "record": record.to_dict()}, separators=(",", ":"))


def event_in(body: str) -> Event:
    """The event a delivery's body announces: for deliveries queued before the event was
    part of the job. ValueError if the body names none."""
    event = json.loads(body).get("type")
    if event not in EVENTS:
        raise ValueError(f"a webhook body announcing {event!r}, not one of {', '.join(EVENTS)}")
    return event  # type: ignore[no-any-return]


def signature(secret: bytes, timestamp: int, body: str) -> str:
    mac = hmac.new(secret, f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"
