"""Presigned S3 URLs: on the store's public endpoint for clients (`?redirect=1`), and on its
own endpoint for nginx when a download is handed off (api/downloads.py).

Signing is local computation: the clients are built with the region, so no request is sent.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from core.settings import Settings
from core.storage import Store

# A handed-off URL is used by nginx at once and never reaches a client; the margin is for a
# store whose clock runs ahead of ours (S3 refuses a URL it thinks has expired).
HANDOFF_SECONDS = 900


class Presigner:
    """`?redirect=1` URLs on the store's public endpoint, valid PICSTREAM_PRESIGN_SECONDS."""

    def __init__(self, settings: Settings) -> None:
        self.public = Store.as_clients_see_it(settings)
        self.seconds = settings.presign_seconds

    def url(self, key: str, content_type: str) -> str:
        return self.public.presigned_get(key, self.seconds, content_type)


def store_path(store: Store, key: str) -> str:
    """Path and query of a presigned GET of `key` on the store's own endpoint, signed for its
    Host (deploy/nginx.conf sends exactly that), for nginx to fetch a handed-off download."""
    parts = urlsplit(store.presigned_get(key, HANDOFF_SECONDS))
    return f"{parts.path}?{parts.query}"
