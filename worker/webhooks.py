"""Webhook delivery job (queued by core/webhooks.py when an image reaches its final state)."""

from __future__ import annotations

import logging
import time

import redis
import urllib3
from rq import get_current_job

from core.errors import PicstreamError
from core.inflight import delivery_landed
from core.logs import current_request_id
from core.metrics import WEBHOOK_DELIVERIES
from core.webhooks import Event, check_url, event_in, signature
from worker.services import JobServices

log = logging.getLogger(__name__)

TIMEOUT = urllib3.Timeout(connect=5, read=15)


class DeliveryFailed(Exception):
    """The receiver did not answer 2xx; rq retries the job with backoff."""


def deliver(url: str, body: str, image_id: str, event: Event | None = None) -> None:
    """rq job: POST `body`, signed, to `url`. `event` is the event the body announces;
    deliveries queued by the previous version do not name it, and it is read from the body."""
    hooks = JobServices.configured_settings().webhooks
    # The allow-list is checked again at delivery: it may have shrunk since the upload.
    try:
        check_url(url, hooks.hosts)
    except PicstreamError:
        WEBHOOK_DELIVERIES.labels("not_sent").inc()
        raise
    if hooks.secret is None:
        WEBHOOK_DELIVERIES.labels("not_sent").inc()
        raise DeliveryFailed("PICSTREAM_WEBHOOK_SECRET is not set")
    event = event or event_in(body)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "picstream-webhook/1",
        "X-Picstream-Event": event,
        "X-Picstream-Signature": signature(hooks.secret, int(time.time()), body),
    }
    request_id = current_request_id()  # the upload's, from the job (core/logs.py)
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    with urllib3.PoolManager(retries=False, timeout=TIMEOUT) as pool:
        try:
            response = pool.request(
                "POST", url, body=body.encode(), headers=headers, redirect=False
            )
        except urllib3.exceptions.HTTPError as exc:
            WEBHOOK_DELIVERIES.labels("unreachable").inc()
            raise DeliveryFailed(f"webhook for {image_id} failed: {type(exc).__name__}") from exc
    if not 200 <= response.status < 300:
        WEBHOOK_DELIVERIES.labels("refused").inc()
        raise DeliveryFailed(f"webhook for {image_id} answered {response.status}")
    WEBHOOK_DELIVERIES.labels("delivered").inc()
    _landed()
    # SECURITY: never the URL: a receiver may take a secret in its query string.
    log.info("webhook for %s delivered (%s)", image_id, event)


def _landed() -> None:
    """The delivery is no longer in flight (core/inflight.py). Best effort: should this
    write fail, the janitor finds the job finished (or gone) and lets it land itself."""
    job = get_current_job()
    if job is None:
        return
    try:
        delivery_landed(job.connection, job.id)
    except redis.RedisError as exc:
        log.info("delivery %s stays listed in flight for now: %s", job.id, type(exc).__name__)
