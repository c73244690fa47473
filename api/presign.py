"""Presigned S3 URLs on the store's public endpoint (`?redirect=1`).

Signing is local computation: the client is built with the region, so no request is sent.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit

from minio import Minio

from core.settings import Settings


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
