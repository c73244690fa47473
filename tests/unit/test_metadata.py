"""Alt text and metadata: the rules (core/models.py), the merge patch (api/metadata.py) and
the multipart fields kept around a streamed file (api/multipart.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api.metadata import merge_patch
from api.multipart import open_file_part
from core.errors import BadRequest, InvalidAlt, InvalidMetadata
from core.models import (
    ALT_MAX_CHARS,
    METADATA_MAX_BYTES,
    Annotations,
    parse_metadata,
    strict_json,
    validate_alt,
    validate_metadata,
)

B = b"----boundary"


# ------------------------------------------------------------------ alt


@pytest.mark.parametrize(
    "text",
    ["", "A red bicycle", "a" * ALT_MAX_CHARS, "\u05e9\u05dc\u05d5\u05dd \u200f!", "\u00e9\u81ea"],
)
def test_alt_text_that_is_kept_as_sent(text: str) -> None:
    assert validate_alt(text) == text


def test_no_alt_is_none() -> None:
    assert validate_alt(None) is None


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("a" * (ALT_MAX_CHARS + 1), "1001 characters"),
        ("line\nbreak", "U+000A"),
        ("carriage\rreturn", "U+000D"),
        ("nul\x00", "U+0000"),
        ("tab\t", "U+0009"),
        ("c1\x85", "U+0085"),
        ("separator\u2028", "U+2028"),
        ("override\u202e", "U+202E"),
        ("isolate\u2066", "U+2066"),
        ("surrogate\ud800", "U+D800"),
        (5, "not a number"),
        (["a"], "not an array"),
    ],
)
def test_alt_text_that_is_refused(value: object, words: str) -> None:
    with pytest.raises(InvalidAlt, match=words.replace("+", r"\+")):
        validate_alt(value)


# ------------------------------------------------------------------ metadata


def test_metadata_objects_nested_values_and_the_size_limit() -> None:
    value = {"a": [1, 2.5, True, None, {"b": "\u00fc"}], "c": {"d": {}}}
    assert parse_metadata(json.dumps(value)) == value
    # Exactly 4 KiB as compact UTF-8 JSON is kept; one byte more is not. Non-ASCII counts
    # in UTF-8 bytes, not characters.
    fill = METADATA_MAX_BYTES - len('{"k":""}')
    assert validate_metadata({"k": "x" * fill})
    with pytest.raises(InvalidMetadata, match="4097 bytes"):
        validate_metadata({"k": "x" * (fill + 1)})
    with pytest.raises(InvalidMetadata, match="4097 bytes"):
        validate_metadata({"k": "x" * (fill - 1) + "\u00fc"})


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[]", "not an array"),
        ("null", "not null"),
        ("3", "not a number"),
        ('"s"', "not a string"),
        ("{", "not valid JSON"),
        ("", "not valid JSON"),
        ('{"n": NaN}', "NaN"),
        ('{"n": -Infinity}', "-Infinity"),
        ('{"n": 1e999}', "finite"),
        ('{"a": 1, "a": 1}', "repeats the key"),
        ('{"s": "\\udc00"}', "surrogate"),
        ('{"\\ud800": 1}', "surrogate"),
        ("[" * 34 + "]" * 34, "deep"),
        ("[" * 5000 + "]" * 5000, "deep"),
        ('{"n": ' + "9" * 5000 + "}", "not valid JSON"),
        (" " * (16 * 1024 + 1), "at most 16384"),
    ],
)
def test_metadata_that_is_refused(text: str, words: str) -> None:
    with pytest.raises(InvalidMetadata, match=words):
        parse_metadata(text)


def test_nesting_up_to_the_limit_is_kept() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(32):
        node["a"] = {}
        node = node["a"]
    assert parse_metadata(json.dumps(deep)) == deep


def test_metadata_given_as_python_values_must_be_json_values() -> None:
    with pytest.raises(InvalidMetadata, match="finite"):
        validate_metadata({"n": float("nan")})
    with pytest.raises(InvalidMetadata, match="keys must be strings"):
        validate_metadata({1: "x"})
    with pytest.raises(InvalidMetadata, match="JSON values"):
        validate_metadata({"s": {1, 2}})


def test_strict_json_names_what_it_reads() -> None:
    with pytest.raises(BadRequest, match="the body repeats the key 'a'"):
        strict_json(b'{"a": 1, "a": 2}', "the body")
    with pytest.raises(BadRequest, match="the body is not valid JSON"):
        strict_json(b"\xff", "the body")


def test_annotations_parse_both_or_neither() -> None:
    assert Annotations.parse(None, None) == Annotations()
    assert Annotations.parse("", '{"a": 1}') == Annotations("", {"a": 1})


# ------------------------------------------------------------------ RFC 7396 merge patch

# RFC 7396 Appendix A, every example.
RFC_7396_EXAMPLES = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "result"), RFC_7396_EXAMPLES)
def test_merge_patch_follows_rfc_7396(target: Any, patch: Any, result: Any) -> None:
    before = json.dumps(target)
    assert merge_patch(target, patch) == result
    assert merge_patch(merge_patch(target, patch), patch) == result  # idempotent
    assert json.dumps(target) == before  # the target is not changed in place


# ------------------------------------------------------------------ multipart fields


def body(*parts: tuple[str, bytes, bool]) -> bytes:
    out = b""
    for name, content, is_file in parts:
        filename = '; filename="f.jpg"' if is_file else ""
        out += (
            b"--"
            + B
            + f'\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n\r\n'.encode()
        )
        out += content + b"\r\n"
    return out + b"--" + B + b"--\r\n"


def reader(data: bytes, step: int = 7) -> Any:
    view = memoryview(data)
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        take = min(n, step, len(view) - pos)
        pos += take
        return bytes(view[pos - take : pos])

    return read


def read_to_end(part: Any) -> bytes:
    out = b""
    while chunk := part.read(5):
        out += chunk
    return out


def test_fields_before_and_after_the_file_are_kept_and_others_skipped() -> None:
    data = body(
        ("note", b"skipped", False),
        ("alt", b"before", False),
        ("file", b"IMAGE-BYTES", True),
        ("metadata", b'{"a": 1}', False),
        ("other", b"x" * 100, False),
    )
    part = open_file_part(reader(data), B, chunk_size=16, capture=frozenset({"alt", "metadata"}))
    assert part.fields == {"alt": b"before"}
    assert not part.done
    assert read_to_end(part) == b"IMAGE-BYTES"
    assert part.done
    assert part.fields == {"alt": b"before", "metadata": b'{"a": 1}'}


def test_without_capture_every_field_is_skipped() -> None:
    data = body(("alt", b"x", False), ("file", b"F", True), ("metadata", b"{}", False))
    part = open_file_part(reader(data), B)
    assert read_to_end(part) == b"F"
    assert part.fields == {}


@pytest.mark.parametrize(
    ("parts", "words"),
    [
        ((("alt", b"a", False), ("alt", b"b", False), ("file", b"F", True)), "more than once"),
        ((("alt", b"a", False), ("file", b"F", True), ("alt", b"b", False)), "more than once"),
        ((("alt", b"x" * 11, False), ("file", b"F", True)), "longer than 10 bytes"),
        ((("file", b"F", True), ("metadata", b"x" * 11, False)), "longer than 10 bytes"),
    ],
)
def test_captured_fields_are_bounded_and_given_once(
    parts: tuple[tuple[str, bytes, bool], ...], words: str
) -> None:
    capture = frozenset({"alt", "metadata"})
    with pytest.raises(BadRequest, match=words):
        part = open_file_part(reader(body(*parts)), B, capture=capture, max_field_bytes=10)
        read_to_end(part)


def test_a_field_of_exactly_the_limit_is_kept() -> None:
    data = body(("file", b"F", True), ("alt", b"x" * 10, False))
    part = open_file_part(reader(data, 3), B, capture=frozenset({"alt"}), max_field_bytes=10)
    assert read_to_end(part) == b"F"
    assert part.fields == {"alt": b"x" * 10}
