"""How a record looks over HTTP: the stored record plus links."""

from __future__ import annotations

from typing import Any

import falcon

from api.downloads import version
from api.signed_links import Signer
from core.models import ImageRecord


def record_json(
    req: falcon.Request, record: ImageRecord, sign: Signer | None = None
) -> dict[str, Any]:
    """The record with `url` (itself), `original_url`, and a `url` on each ready variant;
    with a signer, `signed_url`s that work without the API key until they expire: the
    original's, each ready variant's, `best_signed_url` (add `&width=N`) and
    `events_signed_url` (for a browser's EventSource, which cannot send the key)."""
    base = f"/v1/images/{record.id}"
    data = record.to_dict()
    data["url"] = f"{req.prefix}{base}"
    data["original_url"] = _pinned(req, f"{base}/original", record.blake3)
    if sign is not None:
        data["original_signed_url"] = _signed(req, f"{base}/original", record.blake3, sign)
        # Not pinned: what they answer changes (the client's Accept, the conversion).
        data["best_signed_url"] = f"{req.prefix}{base}/best?{sign(f'{base}/best')}"
        data["events_signed_url"] = f"{req.prefix}{base}/events?{sign(f'{base}/events')}"
    for variant in data["variants"]:
        if variant["status"] == "ready":
            path = f"{base}/variants/{variant['name']}"
            variant["url"] = _pinned(req, path, variant["blake3"])
            if sign is not None:
                variant["signed_url"] = _signed(req, path, variant["blake3"], sign)
    return data


def _pinned(req: falcon.Request, path: str, blake3: str) -> str:
    """A link to exactly these bytes: `?v=` makes it cacheable as immutable."""
    return f"{req.prefix}{path}?v={version(blake3)}"


def _signed(req: falcon.Request, path: str, blake3: str, sign: Signer) -> str:
    return f"{_pinned(req, path, blake3)}&{sign(path)}"
