"""Webhooks: the final record, POSTed to a URL the owner chose, signed, with retries.

A URL comes from the upload (`?callback=`) or from the owner's setting
(`PICSTREAM_WEBHOOKS=owner=url,...`). Only hosts on `PICSTREAM_WEBHOOK_HOSTS` are ever
called — the allow-list is what keeps the service from being pointed at internal networks —
and redirects are not followed. Delivery is an rq job (worker/webhooks.py) queued in the same
transaction as the final status, retried with backoff until the receiver answers 2xx.

The receiver verifies `X-Picstream-Signature: t=<unix time>,v1=<hex>`, where v1 is
HMAC-SHA256 over `"<t>.<body>"` keyed by `PICSTREAM_WEBHOOK_SECRET`, and should refuse old
timestamps (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from urllib.parse import urlsplit

from redis.client import Pipeline
from rq import Queue, Retry

from core.errors import BadRequest
from core.models import ImageRecord

DELIVER = "worker.webhooks.deliver"


def check_url(url: str, allowed_hosts: frozenset[str]) -> str:
    """The URL if it may be called; BadRequest naming why not."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("callback must be an absolute http(s) URL")
    if parts.username or parts.password:
        raise BadRequest("callback URLs must not carry credentials")
    host = parts.hostname.lower()
    with_port = f"{host}:{parts.port}" if parts.port else host
    if host not in allowed_hosts and with_port not in allowed_hosts:
        raise BadRequest(f"callback host {with_port!r} is not on PICSTREAM_WEBHOOK_HOSTS")
    return url


def payload(record: ImageRecord) -> str:
    return json.dumps(
        {"type": f"image.{record.status}", "record": record.to_dict()}, separators=(",", ":")
    )


def signature(secret: bytes, timestamp: int, body: str) -> str:
    mac = hmac.new(secret, f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def enqueue_delivery(
    queue: Queue, url: str, record: ImageRecord, pipeline: Pipeline, intervals: tuple[int, ...]
) -> None:
    """Queue one delivery of the record's final state inside the caller's transaction,
    retried after each of `intervals` seconds until the receiver answers 2xx."""
    queue.enqueue_call(
        DELIVER,
        kwargs={"url": url, "body": payload(record), "image_id": record.id},
        retry=Retry(max=len(intervals), interval=list(intervals)),
        description=f"webhook {record.owner}/{record.id} {record.status}",
        pipeline=pipeline,
    )
