"""Repr-Digest parsing, ids, file names, the key ring."""

from __future__ import annotations

import base64
import hashlib

import pytest

from api.auth import KeyRing
from api.digest import parse_repr_digest
from core.errors import BadRequest
from core.models import IMAGE_ID_RE, clean_filename, new_image_id, validate_image_id


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_repr_digest() -> None:
    d256 = hashlib.sha256(b"x").digest()
    d512 = hashlib.sha512(b"x").digest()
    assert parse_repr_digest(None) == {}
    assert parse_repr_digest(f"sha-256=:{b64(d256)}:") == {"sha256": d256}
    both = parse_repr_digest(f"sha-512=:{b64(d512)}:, md5=:AAAA:, sha-256=:{b64(d256)}:")
    assert both == {"sha256": d256, "sha512": d512}
    for bad in ("md5=:AAAA:", "sha-256=abc", f"sha-256=:{b64(d256[:10])}:", "sha-256=:!!:"):
        with pytest.raises(BadRequest):
            parse_repr_digest(bad)


def test_ids() -> None:
    ids = [new_image_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(IMAGE_ID_RE.fullmatch(i) for i in ids)
    assert validate_image_id("A-z_09") == "A-z_09"
    for bad in ("", "a" * 65, "a/b", "a.b", "é", "a b", "..", "a\x00"):
        with pytest.raises(BadRequest):
            validate_image_id(bad)


def test_filenames_are_kept_for_display_only() -> None:
    assert clean_filename("C:\\Users\\me\\IMG_0001.HEIC") == "IMG_0001.HEIC"
    assert clean_filename("../../etc/passwd") == "passwd"
    assert clean_filename("evil\r\nSet-Cookie: x.jpg") == "evilSet-Cookie: x.jpg"
    assert clean_filename("..") is None
    assert clean_filename("") is None
    assert len(clean_filename("a" * 1000) or "") == 255


def test_key_ring() -> None:
    ring = KeyRing((("alice", "k" * 20), ("alice", "j" * 20), ("bob", "b" * 20)))
    assert ring.owner_of("k" * 20) == "alice"
    assert ring.owner_of("j" * 20) == "alice"
    assert ring.owner_of("b" * 20) == "bob"
    assert ring.owner_of("k" * 19) is None
    assert ring.owner_of("") is None
    assert ring.owner_of("é") is None
