"""Alt text and metadata (issue #10): given with every kind of upload, changed with PATCH,
through a real gunicorn into SeaweedFS and Redis.

What a client sees (statuses, the record) and what is kept: the record in Redis and its
bucket copy (`record.json`) agree after every change, and a refused value leaves nothing in
the bucket or in Redis.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

import pytest
from redis import Redis

from core.leases import MULTIPART_KEY
from core.records import PURGES_KEY, Records
from core.settings import Settings
from core.storage import Store
from tests.http import Api, Response
from tests.images import jpeg, png
from tests.integration.conftest import BOB_KEY
from tests.keys import keys_of
from tests.lifecycle import ActingStore
from worker.jobs import ImageJob
from worker.services import JobServices

MiB = 1024 * 1024
MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}
TUS = {"Tus-Resumable": "1.0.0"}
PROBLEM = "urn:picstream:problem:"
LINKS = ("url", "original_url")


# ------------------------------------------------------------------ helpers


def form(parts: Iterable[tuple[str, bytes, str | None]]) -> tuple[list[bytes], str]:
    """multipart/form-data of (field name, content, filename or None) parts, in this order."""
    boundary = "----picstream" + secrets.token_hex(8)
    pieces: list[bytes] = []
    for name, content, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"\r\nContent-Type: image/jpeg'
        pieces += [f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode(), content]
        pieces.append(b"\r\n")
    pieces.append(f"--{boundary}--\r\n".encode())
    return pieces, f"multipart/form-data; boundary={boundary}"


def big_jpeg(size: int) -> bytes:
    """A JPEG header and `size` bytes in all: several parts of the store's multipart upload."""
    head = jpeg(640, 480, pad=300)
    return head + os.urandom(size - len(head))


def query(**params: str) -> str:
    return "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def patch(api: Api, image_id: str, body: Any, **headers: str) -> Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return api.request("PATCH", f"/v1/images/{image_id}", data, {**MERGE_PATCH, **headers})


def tus_metadata(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


def assert_problem(resp: Response, status: int, slug: str, *words: str) -> None:
    assert resp.status == status, resp.body
    assert resp.header("Content-Type") == "application/problem+json"
    problem = resp.json
    assert problem["type"] == PROBLEM + slug, problem
    for word in words:
        assert word in problem["detail"], problem


def stored(store: Store, redis_client: Redis, record: dict[str, Any]) -> dict[str, Any]:
    """The record as Redis holds it, asserted equal to its bucket copy."""
    live = Records(redis_client).get(record["owner"], record["id"]).to_dict()
    assert json.loads(store.read_bytes(keys_of(record).record)) == live
    return live


def nothing_is_left(store: Store, redis_client: Redis, *, guards: int = 0) -> None:
    """What a refused upload must leave: no object, no multipart upload, no record, no
    lease, no tus state, and no purge still to run but `guards`: an upload that fails while
    its body is read leaves its incarnation's guard for the janitor (api/uploads.py; the
    prefix it would purge is empty by then, as asserted)."""
    assert store.incomplete_uploads() == []
    assert store.keys("") == []
    assert redis_client.keys("picstream:image:*") == []
    assert redis_client.keys("picstream:lease:*") == []
    assert redis_client.keys("picstream:tus:*") == []
    assert redis_client.zcard(PURGES_KEY) == guards
    assert redis_client.zcard(MULTIPART_KEY) == 0


def uploaded(api: Api, image_id: str = "bike", **meta: Any) -> dict[str, Any]:
    query_string = query(**{k: v if isinstance(v, str) else compact(v) for k, v in meta.items()})
    resp = api.upload(png(8, 6), image_id, query=query_string if meta else "")
    assert resp.status == 201, resp.body
    return dict(resp.json)


# ------------------------------------------------------------------ on upload


def test_alt_and_metadata_in_the_query_reach_the_record_and_its_bucket_copy(
    api: Api, store: Store, redis_client: Redis
) -> None:
    meta = {"caption": "Holiday", "tags": ["bike", "red"], "place": {"lat": 48.1, "lon": 11.5}}
    resp = api.upload(
        jpeg(64, 48), query=query(alt="A red bicycle \u2013 caf\u00e9", metadata=compact(meta))
    )

    assert resp.status == 201, resp.body
    record = resp.json
    assert (record["alt"], record["metadata"]) == ("A red bicycle \u2013 caf\u00e9", meta)
    assert api.request("GET", f"/v1/images/{record['id']}").json == record
    live = stored(store, redis_client, record)
    assert (live["alt"], live["metadata"]) == ("A red bicycle \u2013 caf\u00e9", meta)


def test_alt_and_metadata_in_headers_percent_encoded_and_utf8(
    api: Api, store: Store, redis_client: Redis
) -> None:
    alt = "Ein rotes Fahrrad \u2013 \u00abCaf\u00e9\u00bb \u81ea\u8ee2\u8eca %"
    meta = {"caption": "Ürlaub", "n": 3}
    headers = {
        "Picstream-Alt": quote(alt, safe=""),
        # Raw UTF-8 bytes, as many clients send them (http.client sends str as Latin-1).
        "Picstream-Metadata": json.dumps(meta, ensure_ascii=False).encode().decode("latin-1"),
    }
    resp = api.upload(png(8, 6), "headers-1", headers=headers)

    assert resp.status == 201, resp.body
    assert (resp.json["alt"], resp.json["metadata"]) == (alt, meta)
    assert stored(store, redis_client, resp.json)["alt"] == alt


def test_an_empty_alt_is_kept_and_marks_a_decorative_image(api: Api) -> None:
    record = uploaded(api, "spacer", alt="")
    assert (record["alt"], record["metadata"]) == ("", {})
    plain = api.upload(png(9, 6), "plain")
    assert (plain.json["alt"], plain.json["metadata"]) == (None, {})


@pytest.mark.parametrize("chunked", [False, True])
def test_multipart_fields_before_and_after_a_file_of_several_parts(
    api: Api, store: Store, redis_client: Redis, chunked: bool
) -> None:
    """Fields before the file are read before it, fields after it once it is stored: the
    browser's FormData sends them in the order they were appended."""
    image = big_jpeg(11 * MiB)  # three parts of 5 MiB: the file is streamed, not held
    meta = {"caption": "after the file", "nested": {"a": [1, 2, {"b": None}]}}
    pieces, content_type = form(
        [
            ("note", b"ignored", None),
            ("alt", "Zwei Räder".encode(), None),
            ("file", image, "bike.jpg"),
            ("metadata", compact(meta).encode(), None),
            ("other", b"x" * 1000, None),
        ]
    )
    resp = api.request(
        "POST", "/v1/images", pieces, {"Content-Type": content_type}, chunked=chunked
    )

    assert resp.status == 201, resp.body
    record = resp.json
    assert (record["alt"], record["metadata"], record["size"]) == ("Zwei Räder", meta, len(image))
    assert record["filename"] == "bike.jpg"
    assert store.read_bytes(keys_of(record).original) == image
    assert stored(store, redis_client, record)["metadata"] == meta


def test_metadata_given_before_the_file_and_alt_after_it(api: Api) -> None:
    pieces, content_type = form(
        [
            ("metadata", b'{"k": "v"}', None),
            ("file", jpeg(32, 32), "a.jpg"),
            ("alt", b"after", None),
        ]
    )
    resp = api.request("PUT", "/v1/images/order-2", pieces, {"Content-Type": content_type})
    assert resp.status == 201, resp.body
    assert (resp.json["alt"], resp.json["metadata"]) == ("after", {"k": "v"})


def test_an_upload_token_may_set_alt_and_metadata(
    api: Api, store: Store, redis_client: Redis
) -> None:
    made = api.request("POST", "/v1/upload-tokens", b"{}", {"Content-Type": "application/json"})
    assert made.status == 201, made.body
    resp = api.upload(
        png(8, 6),
        query=query(alt="From a page", metadata='{"via":"token"}'),
        key=made.json["token"],
    )
    assert resp.status == 201, resp.body
    assert (resp.json["alt"], resp.json["metadata"]) == ("From a page", {"via": "token"})
    assert stored(store, redis_client, resp.json)["alt"] == "From a page"


def test_tus_upload_metadata_alt_and_metadata(api: Api, store: Store, redis_client: Redis) -> None:
    body = big_jpeg(MiB)  # two PATCHes: the state (and the alt with it) outlives a request
    meta = {"caption": "resumable", "n": 1}
    upload_metadata = tus_metadata(
        filename="t.jpg", id="tus-1", alt="Über den Berg", metadata=compact(meta)
    )
    headers = {**TUS, "Upload-Length": str(len(body)), "Upload-Metadata": upload_metadata}
    made = api.request("POST", "/v1/tus", headers=headers)
    assert made.status == 201, made.body
    location = made.header("Location")
    assert location is not None
    octets = {**TUS, "Content-Type": "application/offset+octet-stream"}
    half = len(body) // 2
    first = api.request("PATCH", location, body[:half], {**octets, "Upload-Offset": "0"})
    assert first.status == 204, first.body
    last = api.request("PATCH", location, body[half:], {**octets, "Upload-Offset": str(half)})
    assert last.status == 204, last.body
    assert last.header("Picstream-Image") == "/v1/images/tus-1"

    record = api.request("GET", "/v1/images/tus-1").json
    assert (record["alt"], record["metadata"], record["filename"]) == (
        "Über den Berg",
        meta,
        "t.jpg",
    )
    assert stored(store, redis_client, record)["metadata"] == meta
    echoed = api.request("HEAD", location, headers=TUS)
    assert echoed.header("Upload-Metadata") == upload_metadata


def test_a_repeated_put_keeps_the_records_alt_and_metadata(api: Api) -> None:
    """The same bytes again answer the existing record: PATCH changes alt and metadata."""
    first = uploaded(api, "again", alt="first", metadata={"v": 1})
    again = api.upload(png(8, 6), "again", query=query(alt="second"))
    assert again.status == 200, again.body
    assert (
        (again.json["alt"], again.json["metadata"])
        == ("first", {"v": 1})
        == (
            first["alt"],
            first["metadata"],
        )
    )


# ------------------------------------------------------------------ refused on upload

TOO_BIG = compact({"blob": "x" * 4100})
REFUSED_QUERIES = {
    "alt too long": (query(alt="a" * 1001), "1001 characters"),
    "alt with a line break": (query(alt="two\nlines"), "U+000A"),
    "alt with NUL": ("?alt=a%00b", "U+0000"),
    "alt with a bidi override": (query(alt="abc\u202edef"), "U+202E"),
    "alt not UTF-8": ("?alt=%FF", "UTF-8"),
    "alt twice": ("?alt=a&alt=b", "more than once"),
    "metadata not JSON": (query(metadata="{caption: 1}"), "not valid JSON"),
    "metadata an array": (query(metadata="[1, 2]"), "not an array"),
    "metadata a string": (query(metadata='"text"'), "not a string"),
    "metadata NaN": (query(metadata='{"n": NaN}'), "NaN"),
    "metadata infinite": (query(metadata='{"n": 1e999}'), "finite"),
    "metadata repeated key": (query(metadata='{"a": 1, "a": 2}'), "repeats the key"),
    "metadata too deep": (query(metadata="[" * 40 + "]" * 40), "deep"),
}


@pytest.mark.parametrize("given", REFUSED_QUERIES.values(), ids=REFUSED_QUERIES.keys())
def test_invalid_values_in_the_query_are_400_before_the_body(
    api: Api, store: Store, redis_client: Redis, given: tuple[str, str]
) -> None:
    query_string, words = given
    resp = api.upload(png(8, 6), query=query_string)
    assert_problem(resp, 400, "bad-request", words)
    nothing_is_left(store, redis_client)


REFUSED_HEADERS: dict[str, tuple[dict[str, str], str, str]] = {
    "metadata above 4 KiB": ({"Picstream-Metadata": TOO_BIG}, "", "at most 4096"),
    "metadata not JSON": ({"Picstream-Metadata": "{"}, "", "not valid JSON"),
    "metadata an array": ({"Picstream-Metadata": "[]"}, "", "not an array"),
    "metadata not UTF-8": ({"Picstream-Metadata": '{"a": "\xff"}'}, "", "UTF-8"),
    "alt not UTF-8": ({"Picstream-Alt": "caf%E9"}, "", "percent-encoded UTF-8"),
    "alt with CR": ({"Picstream-Alt": "a%0Db"}, "", "U+000D"),
    "alt also in the query": ({"Picstream-Alt": "x"}, "?alt=y", "more than once"),
}


@pytest.mark.parametrize("given", REFUSED_HEADERS.values(), ids=REFUSED_HEADERS.keys())
def test_invalid_values_in_headers_are_400_before_the_body(
    api: Api, store: Store, redis_client: Redis, given: tuple[dict[str, str], str, str]
) -> None:
    headers, query_string, words = given
    resp = api.upload(png(8, 6), "h-1", headers=headers, query=query_string)
    assert_problem(resp, 400, "bad-request", words)
    nothing_is_left(store, redis_client)


def test_metadata_of_exactly_4_kib_is_kept_and_one_byte_more_is_not(api: Api) -> None:
    exact = {"blob": "x" * (4096 - len(compact({"blob": ""})))}
    assert len(compact(exact)) == 4096
    ok = api.upload(png(8, 6), "exact", headers={"Picstream-Metadata": compact(exact)})
    assert ok.status == 201, ok.body
    assert ok.json["metadata"] == exact
    over = {"blob": exact["blob"] + "x"}
    refused = api.upload(png(8, 6), "over", headers={"Picstream-Metadata": compact(over)})
    assert_problem(refused, 400, "bad-request", "4097 bytes")


REFUSED_FIELDS: dict[str, tuple[str, bytes, str]] = {
    "metadata above 4 KiB": ("metadata", TOO_BIG.encode(), "at most 4096"),
    "metadata an array": ("metadata", b"[]", "not an array"),
    "metadata not JSON": ("metadata", b"{]", "not valid JSON"),
    "alt too long": ("alt", b"a" * 1001, "1001 characters"),
    "alt not UTF-8": ("alt", b"\xff", "not UTF-8"),
    "a field above 16 KiB": ("metadata", b" " * (16 * 1024 + 1), "longer than 16384"),
}


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("given", REFUSED_FIELDS.values(), ids=REFUSED_FIELDS.keys())
def test_invalid_form_fields_are_400_and_leave_nothing(
    api: Api, store: Store, redis_client: Redis, given: tuple[str, bytes, str], where: str
) -> None:
    """Before the file: refused before any byte is stored. After it: refused once the
    file (here several parts of a multipart upload) is stored, before the commit, and
    everything stored is deleted again."""
    name, content, words = given
    file_part = ("file", big_jpeg(11 * MiB), "f.jpg")
    parts = (
        [(name, content, None), file_part]
        if where == "before"
        else [file_part, (name, content, None)]
    )
    pieces, content_type = form(parts)
    resp = api.request("POST", "/v1/images", pieces, {"Content-Type": content_type})
    assert_problem(resp, 400, "bad-request", words)
    # A field too long to keep is refused while the body is read (after the file: once the
    # file is stored); every other one once the body has been read, before the commit.
    read_while_stored = where == "after" and "longer than" in words
    nothing_is_left(store, redis_client, guards=1 if read_while_stored else 0)


def test_a_field_given_twice_or_also_in_the_query_is_400(
    api: Api, store: Store, redis_client: Redis
) -> None:
    twice, content_type = form(
        [("alt", b"one", None), ("file", jpeg(16, 16), "f.jpg"), ("alt", b"two", None)]
    )
    resp = api.request("POST", "/v1/images", twice, {"Content-Type": content_type})
    assert_problem(resp, 400, "bad-request", "more than once")
    both, content_type = form([("file", jpeg(16, 16), "f.jpg"), ("metadata", b"{}", None)])
    resp = api.request("POST", "/v1/images?metadata=%7B%7D", both, {"Content-Type": content_type})
    assert_problem(resp, 400, "bad-request", "given twice")
    nothing_is_left(store, redis_client)


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"alt": "a" * 1001}, "1001 characters"),
        ({"metadata": "[1]"}, "not an array"),
        ({"metadata": "{"}, "not valid JSON"),
        ({"alt": "tab\there"}, "U+0009"),
    ],
)
def test_invalid_tus_metadata_is_refused_at_creation(
    api: Api, store: Store, redis_client: Redis, values: dict[str, str], words: str
) -> None:
    headers = {**TUS, "Upload-Length": "1000", "Upload-Metadata": tus_metadata(**values)}
    resp = api.request("POST", "/v1/tus", headers=headers)
    assert_problem(resp, 400, "bad-request", words)
    nothing_is_left(store, redis_client)


# ------------------------------------------------------------------ PATCH


def test_patch_replaces_alt_and_merges_metadata(
    api: Api, store: Store, redis_client: Redis
) -> None:
    uploaded(
        api,
        alt="old",
        metadata={"caption": "x", "old": 1, "place": {"city": "Bonn", "zip": "53111"}, "n": [1]},
    )
    change = {
        "alt": "A red bicycle",
        "metadata": {
            "caption": "y",
            "old": None,
            "place": {"zip": None, "country": "DE"},
            "n": [2],
        },
    }
    resp = patch(api, "bike", change)

    assert resp.status == 200, resp.body
    record = resp.json
    assert record["alt"] == "A red bicycle"
    assert record["metadata"] == {
        "caption": "y",
        "place": {"city": "Bonn", "country": "DE"},
        "n": [2],
    }
    assert api.request("GET", "/v1/images/bike").json == record
    live = stored(store, redis_client, record)
    assert {k: v for k, v in record.items() if k not in LINKS} == live


def test_patch_null_removes_alt_and_clears_metadata_and_touches_only_what_it_names(
    api: Api, store: Store, redis_client: Redis
) -> None:
    uploaded(api, alt="old", metadata={"a": 1})
    only_metadata = patch(api, "bike", {"metadata": {"b": 2}})
    assert (only_metadata.json["alt"], only_metadata.json["metadata"]) == ("old", {"a": 1, "b": 2})
    no_alt = patch(api, "bike", {"alt": None})
    assert (no_alt.json["alt"], no_alt.json["metadata"]) == (None, {"a": 1, "b": 2})
    cleared = patch(api, "bike", {"metadata": None})
    assert (cleared.json["alt"], cleared.json["metadata"]) == (None, {})
    nothing = patch(api, "bike", {})
    assert nothing.status == 200 and nothing.json == cleared.json
    assert stored(store, redis_client, cleared.json)["metadata"] == {}


def test_patch_as_application_json_and_chunked(api: Api, store: Store, redis_client: Redis) -> None:
    uploaded(api)
    as_json = api.request(
        "PATCH",
        "/v1/images/bike",
        [b'{"alt": ', b'"chunked"}'],
        {"Content-Type": "application/json; charset=utf-8"},
        chunked=True,
    )
    assert as_json.status == 200, as_json.body
    assert as_json.json["alt"] == "chunked"
    assert stored(store, redis_client, as_json.json)["alt"] == "chunked"


REFUSED_PATCHES: dict[str, tuple[bytes, str]] = {
    "not JSON": (b"{alt: 1}", "not valid JSON"),
    "empty": (b"", "not valid JSON"),
    "not an object": (b'["alt"]', "must be a JSON object"),
    "another member": (b'{"alt": "x", "status": "ready"}', "not 'status'"),
    "alt not a string": (b'{"alt": 5}', "not a number"),
    "alt too long": (json.dumps({"alt": "a" * 1001}).encode(), "1001 characters"),
    "alt with a line break": (b'{"alt": "a\\nb"}', "U+000A"),
    "alt with a lone surrogate": (b'{"alt": "\\ud800"}', "U+D800"),
    "metadata not an object": (b'{"metadata": [1]}', "not an array"),
    "metadata too large": (json.dumps({"metadata": {"big": "x" * 4100}}).encode(), "at most 4096"),
    "metadata NaN": (b'{"metadata": {"n": NaN}}', "NaN"),
    "metadata infinite": (b'{"metadata": {"n": -1e400}}', "finite"),
    "repeated key": (b'{"alt": "a", "alt": "b"}', "repeats the key"),
    "too deep": (b'{"metadata": ' + b'{"a":' * 40 + b"1" + b"}" * 41, "deep"),
}


@pytest.mark.parametrize("given", REFUSED_PATCHES.values(), ids=REFUSED_PATCHES.keys())
def test_an_invalid_patch_is_400_and_changes_nothing(
    api: Api, store: Store, redis_client: Redis, given: tuple[bytes, str]
) -> None:
    before = uploaded(api, alt="kept", metadata={"k": "v"})
    body, words = given
    assert_problem(patch(api, "bike", body), 400, "bad-request", words)
    after = api.request("GET", "/v1/images/bike").json
    assert after == before
    assert stored(store, redis_client, after)["alt"] == "kept"


def test_a_patch_making_metadata_too_large_is_refused(api: Api) -> None:
    uploaded(api, metadata={"a": "x" * 3000})
    resp = patch(api, "bike", {"metadata": {"b": "y" * 1500}})
    assert_problem(resp, 400, "bad-request", "at most 4096")
    assert api.request("GET", "/v1/images/bike").json["metadata"] == {"a": "x" * 3000}


def test_patch_body_size_and_media_type(api: Api) -> None:
    uploaded(api)
    too_big = json.dumps({"alt": "x", "metadata": {"pad": " " * 17000}}).encode()
    assert_problem(patch(api, "bike", too_big), 413, "too-large", "16384")
    chunked_big = api.request("PATCH", "/v1/images/bike", [too_big], MERGE_PATCH, chunked=True)
    assert_problem(chunked_big, 413, "too-large")
    wrong_type = api.request(
        "PATCH", "/v1/images/bike", b'{"alt": "x"}', {"Content-Type": "text/plain"}
    )
    assert_problem(wrong_type, 415, "unsupported-media-type")
    assert api.request("GET", "/v1/images/bike").json["alt"] is None


def test_patch_of_an_unknown_or_another_owners_image_is_404(api: Api) -> None:
    uploaded(api)
    as_bob = Api(api.host, api.port, BOB_KEY)
    assert_problem(patch(as_bob, "bike", {"alt": "mine"}), 404, "not-found")
    assert_problem(patch(api, "nope", {"alt": "x"}), 404, "not-found")
    assert_problem(patch(api, "bad%21id", {"alt": "x"}), 400, "bad-request")
    assert api.request("GET", "/v1/images/bike").json["alt"] is None


def test_an_upload_token_cannot_patch(api: Api) -> None:
    uploaded(api)
    made = api.request("POST", "/v1/upload-tokens", b"{}", {"Content-Type": "application/json"})
    assert made.status == 201, made.body
    as_page = Api(api.host, api.port, made.json["token"])
    assert_problem(patch(as_page, "bike", {"alt": "x"}), 403, "token-not-allowed")
    assert api.request("GET", "/v1/images/bike").json["alt"] is None


# ------------------------------------------------------------------ PATCH and the worker


def run_job_with(
    settings: Settings,
    store: Store,
    redis_client: Redis,
    record: dict[str, Any],
    when: Callable[[str, str], bool],
    act: Callable[[], None],
) -> None:
    """Run the conversion job of `record` in-process, doing `act` once `when(method, key)`
    holds for a store call of the job (tests/lifecycle.py `ActingStore`)."""
    services = JobServices(settings, ActingStore(store, when, act), Records(redis_client))
    ImageJob(services, record["owner"], record["id"], record["gen"], record["vset"]).run()


def test_a_patch_racing_a_conversion_loses_neither_the_variants_nor_the_alt(
    api: Api,
    store: Store,
    redis_client: Redis,
    settings: Settings,
    configure_jobs: Callable[[Settings], None],
) -> None:
    """The PATCH lands while the job is mid-way: one variant recorded `ready`, the next
    just written, the rest still to come (each a read-modify-write of the record). Both
    changes survive, and the bucket copy the job writes last holds both."""
    record = uploaded(api, alt="before", metadata={"keep": True})
    assert len(record["variants"]) >= 3, record
    answers: list[Response] = []
    variant_puts: list[str] = []

    def second_variant_stored(method: str, key: str) -> bool:
        if method == "put" and not key.endswith("record.json"):
            variant_puts.append(key)
        return len(variant_puts) == 2

    def change() -> None:
        answers.append(patch(api, "bike", {"alt": "during", "metadata": {"added": 1}}))

    run_job_with(settings, store, redis_client, record, second_variant_stored, change)

    assert answers and answers[0].status == 200, answers
    mid_way = [v["status"] for v in answers[0].json["variants"]]
    assert mid_way.count("ready") == 1 and "pending" in mid_way, mid_way
    final = api.request("GET", "/v1/images/bike").json
    assert final["status"] == "ready"
    assert final["variants"] and all(v["status"] == "ready" for v in final["variants"])
    assert (final["alt"], final["metadata"]) == ("during", {"keep": True, "added": 1})
    assert stored(store, redis_client, final)["alt"] == "during"


def test_a_conversion_ending_after_the_patch_leaves_the_patched_copy_in_the_bucket(
    api: Api,
    store: Store,
    redis_client: Redis,
    settings: Settings,
    configure_jobs: Callable[[Settings], None],
) -> None:
    """The PATCH lands between the job's last record update and its bucket copy."""
    record = uploaded(api, alt="before")
    answers: list[Response] = []

    def change() -> None:
        answers.append(patch(api, "bike", {"alt": "after"}))

    run_job_with(
        settings, store, redis_client, record, lambda method, key: method == "put_json", change
    )

    assert answers and answers[0].status == 200, answers
    final = api.request("GET", "/v1/images/bike").json
    assert (final["status"], final["alt"]) == ("ready", "after")
    stored(store, redis_client, final)


def test_the_conversion_keeps_alt_and_metadata(
    api: Api, store: Store, redis_client: Redis, run_jobs: Callable[[], None]
) -> None:
    uploaded(api, alt="kept", metadata={"k": [1, 2]})
    run_jobs()
    final = api.request("GET", "/v1/images/bike").json
    assert (final["status"], final["alt"], final["metadata"]) == ("ready", "kept", {"k": [1, 2]})
    stored(store, redis_client, final)
