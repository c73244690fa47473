"""Presigned S3 URLs: on the store's public endpoint for clients (`?redirect=1`), and on its
own endpoint for nginx when a download is handed off (api/downloads.py).

Signing is local computation: the clients are built with the region, so no request is sent.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit

from minio import Minio

from core.settings import Settings
from core.storage import Store

# A handed-off URL is used by nginx at once and never reaches a client; the margin is for a
# store whose clock runs ahead of ours (S3 refuses a URL it thinks has expired).
HANDOFF_SECONDS = 900


class Presigner:
    def __init__(self, settings: Settings) -> None:
        public = urlsplit(settings.s3_public_endpoint)
        self.client = Minio(
            public.netloc,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=public.scheme == "https",
            region=settings.s3_region,
        )
        self.bucket = settings.s3_bucket
        self.ttl = timedelta(seconds=settings.presign_seconds)

    def url(self, key: str, content_type: str) -> str:
        return self.client.presigned_get_object(
            self.bucket,
            key,
            expires=self.ttl,
            response_headers={"response-content-type": content_type},
        )


def store_path(store: Store, key: str) -> str:
    """Path and query of a presigned GET of `key` on the store's own endpoint, signed for its
    Host (deploy/nginx.conf sends exactly that), for nginx to fetch a handed-off download."""
    url = store.client.presigned_get_object(
        store.bucket, key, expires=timedelta(seconds=HANDOFF_SECONDS)
    )
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"
