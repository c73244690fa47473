"""The API description: api/openapi.yaml (written by hand, shipped with the package),
served as JSON at /v1/openapi.json."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import falcon
import yaml


def load_document() -> dict[str, Any]:
    """The OpenAPI document as data (read from the installed package, not the work tree)."""
    text = resources.files("api").joinpath("openapi.yaml").read_text(encoding="utf-8")
    document = yaml.safe_load(text)
    if not isinstance(document, dict):
        raise ValueError("api/openapi.yaml is not a mapping")
    return document


class OpenAPIDocument:
    """/v1/openapi.json: read and serialised once, at start-up."""

    def __init__(self) -> None:
        self.body = json.dumps(load_document(), separators=(",", ":")).encode()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.set_header("Cache-Control", "no-cache")
        resp.data = self.body
