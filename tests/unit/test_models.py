"""The record's JSON form: complete, and owned by whoever asked for it."""

from __future__ import annotations

import json
from dataclasses import replace

from core.models import ImageRecord, PendingSet, Placeholder, Variant

FULL = ImageRecord(
    id="a1",
    owner="alice",
    size=1234,
    blake3="b" * 64,
    format="jpeg",
    content_type="image/jpeg",
    width=40,
    height=30,
    orientation=6,
    filename="photo.jpg",
    created_at="2026-11-29T01:02:03.004Z",
    status="ready",
    variants=(Variant("thumb", "ready", "webp", 4, 3, 99, "c" * 64), Variant("large")),
    callback="https://example.com/hook",
    gen="0123456789abcdef01",
    vset="0123456789abcdef02",
    pending=PendingSet("0123456789abcdef03", "other", (Variant("thumb", "failed", error="x"),)),
    alt="a cat",
    metadata={"album": {"tags": ["a", "b"]}},
    placeholder=Placeholder("3OcRJYB4d3h/iIeHeEh3eIhw+j2w", "#a0b0c0"),
)


def test_every_field_round_trips_through_json() -> None:
    for record in (FULL, replace(FULL, pending=None, placeholder=None, metadata={})):
        data = json.loads(json.dumps(record.to_dict()))
        assert ImageRecord.from_dict(data) == record
        assert set(data) == set(ImageRecord.__dataclass_fields__)


def test_nested_values_come_out_as_plain_json() -> None:
    data = FULL.to_dict()
    assert data["variants"][0] == {
        "name": "thumb",
        "status": "ready",
        "format": "webp",
        "width": 4,
        "height": 3,
        "size": 99,
        "blake3": "c" * 64,
        "error": None,
    }
    assert data["pending"]["variants"][0]["error"] == "x"
    assert data["placeholder"] == {"thumbhash": "3OcRJYB4d3h/iIeHeEh3eIhw+j2w", "color": "#a0b0c0"}


def test_the_dict_shares_nothing_with_the_record() -> None:
    data = FULL.to_dict()
    data["metadata"]["album"]["tags"].append("c")
    data["variants"][0]["name"] = "changed"
    assert FULL.metadata == {"album": {"tags": ["a", "b"]}}
    assert FULL.variants[0].name == "thumb"
