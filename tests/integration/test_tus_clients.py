"""Resumable uploads (tus 1.0 at /v1/tus) from tuspy, the official Python tus client.

tuspy reads each chunk into memory and sends it as one PATCH; `uploader(url=...)` asks the
server where an upload stands (HEAD) and goes on from there. The chunk sizes straddle S3's
5 MiB minimum part, and one upload is cut mid-body and finished through another web server
on the same Redis and S3: the record's BLAKE3 must be the file's, exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import IO, Any

import pytest
from tusclient.client import TusClient
from tusclient.exceptions import TusCommunicationError, TusUploadFailed
from tusclient.uploader.uploader import Uploader

from tests.browser import DirectApi, MiB, mint_token, path_of
from tests.integration.conftest import ALICE_KEY, SiteFile


def bearer(direct: DirectApi, auth: str) -> dict[str, str]:
    """Authorization for a tus client: a fresh upload token, or Alice's API key."""
    credential = mint_token(direct.api) if auth == "token" else ALICE_KEY
    return {"Authorization": f"Bearer {credential}"}


def uploader(
    base: str,
    headers: dict[str, str],
    stream: IO[bytes],
    chunk_size: int,
    *,
    url: str | None = None,
    metadata: dict[str, str] | None = None,
) -> Uploader:
    """tuspy's uploader for `stream`: a new upload at base/v1/tus, or resuming `url`."""
    client = TusClient(f"{base}/v1/tus", headers=headers)
    made: Uploader = client.uploader(
        file_stream=stream, url=url, chunk_size=chunk_size, metadata=metadata or {}
    )
    return made


def finish(upload: Uploader, timeout: float = 60) -> None:
    """Upload the rest. A 423 (the cut PATCH still holds the upload) or a 409 (it stored
    more after we asked) is answered as tus clients do: ask the offset again, go on."""
    deadline = time.monotonic() + timeout
    while upload.offset < upload.stop_at:
        try:
            send_chunk(upload)
        except TusUploadFailed as exc:
            if exc.status_code not in (409, 423) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # poll the lock with a deadline
            upload.offset = upload.get_offset()


def send_chunk(upload: Uploader) -> None:
    """One PATCH of `chunk_size` bytes (tuspy's own method, untyped)."""
    upload.upload_chunk()  # type: ignore[no-untyped-call]


def image_header(upload: Uploader) -> str | None:
    request = upload.request
    assert request is not None
    value = request.response_headers.get("picstream-image")
    return str(value) if value is not None else None


def record_of(direct: DirectApi, image_id: str) -> dict[str, Any]:
    resp = direct.api.request("GET", f"/v1/images/{image_id}")
    assert resp.status == 200, resp.body
    record: dict[str, Any] = resp.json
    return record


def head(direct: DirectApi, upload_url: str, headers: dict[str, str]) -> dict[str, str]:
    resp = direct.client(None).request(
        "HEAD", path_of(upload_url), headers={"Tus-Resumable": "1.0.0", **headers}
    )
    assert resp.status == 200, (resp.status, resp.headers)
    return resp.headers


def test_one_byte_chunks_of_a_tiny_image(
    start_direct_api: Callable[..., DirectApi], tiny_png: SiteFile
) -> None:
    direct = start_direct_api()
    headers = bearer(direct, "token")
    with tiny_png.path.open("rb") as stream:
        upload = uploader(
            direct.base,
            headers,
            stream,
            1,
            metadata={
                "filename": "tiny.png",
                "filetype": "image/png",
                "id": "tiny",
                "profile": "thumbs",
            },
        )
        upload.upload()
    assert image_header(upload) == "/v1/images/tiny"
    assert upload.url is not None
    after = head(direct, upload.url, headers)
    assert int(after["upload-offset"]) == int(after["upload-length"]) == tiny_png.size
    assert after["picstream-image"] == "/v1/images/tiny"
    record = record_of(direct, "tiny")
    assert (record["blake3"], record["size"]) == (tiny_png.blake3, tiny_png.size)
    assert (record["format"], record["width"], record["height"]) == ("png", 3, 2)
    assert (record["filename"], record["profile"]) == ("tiny.png", "thumbs")


@pytest.mark.parametrize("auth", ["token", "key"])
@pytest.mark.parametrize("chunk_size", [5 * MiB - 1, 5 * MiB + 1], ids=["5MiB-1", "5MiB+1"])
def test_chunks_either_side_of_the_s3_part_minimum(
    start_direct_api: Callable[..., DirectApi],
    medium_tiff: SiteFile,
    auth: str,
    chunk_size: int,
) -> None:
    direct = start_direct_api()
    image_id = f"medium-{auth}-{chunk_size}"
    with medium_tiff.path.open("rb") as stream:
        upload = uploader(
            direct.base,
            bearer(direct, auth),
            stream,
            chunk_size,
            metadata={"filename": "medium.tiff", "id": image_id, "profile": "thumbs"},
        )
        upload.upload()
    assert image_header(upload) == f"/v1/images/{image_id}"
    record = record_of(direct, image_id)
    assert (record["blake3"], record["size"]) == (medium_tiff.blake3, medium_tiff.size)
    assert (record["format"], record["width"], record["height"]) == ("tiff", 2400, 2400)
    assert (record["id"], record["profile"]) == (image_id, "thumbs")


@pytest.mark.parametrize("auth", ["token", "key"])
def test_an_upload_cut_mid_body_resumes_on_another_server(
    start_direct_api: Callable[..., DirectApi],
    medium_tiff: SiteFile,
    auth: str,
) -> None:
    first = start_direct_api(wired=True)
    second = start_direct_api()  # another gunicorn on the same Redis and S3
    wire = first.wire
    assert wire is not None
    headers = bearer(first, auth)
    chunk = 3 * MiB
    metadata = {"filename": "medium.tiff", "id": "resumed", "profile": "thumbs"}
    with medium_tiff.path.open("rb") as stream:
        upload = uploader(first.base, headers, stream, chunk, metadata=metadata)
        while upload.offset < medium_tiff.size // 3:
            send_chunk(upload)
        before = upload.offset
        assert upload.url is not None

        wire.arm(MiB)  # 1 MiB into the next PATCH's body
        with pytest.raises((TusUploadFailed, TusCommunicationError)):
            send_chunk(upload)
        assert wire.tripped.is_set()

        resumed = uploader(
            second.base, headers, stream, chunk, url=second.base + path_of(upload.url)
        )
        # What was stored before the cut is kept (and perhaps what arrived of the cut PATCH).
        assert before <= resumed.offset <= before + chunk
        finish(resumed)
    assert image_header(resumed) == "/v1/images/resumed"
    record = record_of(second, "resumed")
    assert (record["blake3"], record["size"]) == (medium_tiff.blake3, medium_tiff.size)
    assert (record["id"], record["profile"], record["filename"]) == (
        "resumed",
        "thumbs",
        "medium.tiff",
    )
