"""Webhook delivery job (queued by core/webhooks.py when an image reaches its final state)."""

from __future__ import annotations

import logging
import os
import time

import urllib3

from core.settings import Settings
from core.webhooks import check_url, signature

log = logging.getLogger(__name__)

TIMEOUT = urllib3.Timeout(connect=5, read=15)


class DeliveryFailed(Exception):
    """The receiver did not answer 2xx; rq retries the job with backoff."""


def deliver(url: str, body: str, image_id: str) -> None:
    settings = Settings.from_env(os.environ)
    # The allow-list is checked again at delivery: it may have shrunk since the upload.
    check_url(url, settings.webhook_hosts)
    secret = settings.webhook_secret
    if secret is None:
        raise DeliveryFailed("PICSTREAM_WEBHOOK_SECRET is not set")
    event = "image." + ("ready" if '"type":"image.ready"' in body else "failed")
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "picstream-webhook/1",
        "X-Picstream-Event": event,
        "X-Picstream-Signature": signature(secret, int(time.time()), body),
    }
    with urllib3.PoolManager(retries=False, timeout=TIMEOUT) as pool:
        try:
            response = pool.request(
                "POST", url, body=body.encode(), headers=headers, redirect=False
            )
        except urllib3.exceptions.HTTPError as exc:
            raise DeliveryFailed(f"webhook for {image_id} failed: {type(exc).__name__}") from exc
    if not 200 <= response.status < 300:
        raise DeliveryFailed(f"webhook for {image_id} answered {response.status}")
    log.info("webhook for %s delivered (%s)", image_id, event)
