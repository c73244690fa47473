"""Where an image's objects are, from its record as the API returns it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.models import ObjectKeys


def keys_of(record: Mapping[str, Any]) -> ObjectKeys:
    return ObjectKeys(record["owner"], record["id"], record["gen"])


def variant_key(record: Mapping[str, Any], name: str) -> str:
    return keys_of(record).variant(record["vset"], name)
