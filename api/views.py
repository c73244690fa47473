"""How a record looks over HTTP: the stored record plus links."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import falcon

from core.models import ImageRecord

Signer = Callable[[str], str]  # path -> query string that makes it readable without a key


def record_json(
    req: falcon.Request, record: ImageRecord, sign: Signer | None = None
) -> dict[str, Any]:
    """The record with `url` (itself), `original_url`, and a `url` on each ready variant;
    with a signer, `signed_url`s that work without the API key until they expire."""
    base = f"/v1/images/{record.id}"
    data = record.to_dict()
    data["url"] = f"{req.prefix}{base}"
    data["original_url"] = _link(req, f"{base}/original", sign, data, "original")
    for variant in data["variants"]:
        if variant["status"] == "ready":
            path = f"{base}/variants/{variant['name']}"
            variant["url"] = f"{req.prefix}{path}"
            if sign is not None:
                variant["signed_url"] = f"{req.prefix}{path}?{sign(path)}"
    return data


def _link(
    req: falcon.Request, path: str, sign: Signer | None, data: dict[str, Any], name: str
) -> str:
    if sign is not None:
        data[f"{name}_signed_url"] = f"{req.prefix}{path}?{sign(path)}"
    return f"{req.prefix}{path}"
