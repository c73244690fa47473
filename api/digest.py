"""`Repr-Digest` (RFC 9530): the client's checksum of the image bytes, verified before the
upload is completed.

    Repr-Digest: sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:

sha-256 and sha-512 are understood. For a multipart/form-data body the digest covers the file
itself, not the multipart envelope. A header that names only algorithms we do not know is a
400, so a client never believes a check happened that did not; so is a header naming one
algorithm twice (two `Repr-Digest` fields are joined into one list by the server first).
"""

from __future__ import annotations

import base64
import binascii
import re

from core.errors import BadRequest

ALGORITHMS = {"sha-256": ("sha256", 32), "sha-512": ("sha512", 64)}
_MEMBER = re.compile(r"\s*([a-z0-9*_.-]+)\s*=\s*:([A-Za-z0-9+/=]*):\s*")


def parse_repr_digest(header: str | None) -> dict[str, bytes]:
    """hashlib name -> expected digest; empty when the header is absent."""
    if header is None:
        return {}
    found: dict[str, bytes] = {}
    named: list[str] = []
    for member in header.split(","):
        match = _MEMBER.fullmatch(member)
        if not match:
            raise BadRequest("Repr-Digest must look like sha-256=:<base64>:")
        name, value = match.group(1), match.group(2)
        if name in named:
            # Structured-field parsers let the last member win; two checksums for one
            # algorithm mean the sender is confused, and either silent choice could skip a
            # check the client believes in.
            raise BadRequest(f"Repr-Digest names {name} more than once")
        named.append(name)
        if name not in ALGORITHMS:
            continue
        hashlib_name, length = ALGORITHMS[name]
        try:
            digest = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise BadRequest(f"Repr-Digest {name} is not valid base64") from None
        if len(digest) != length:
            raise BadRequest(f"Repr-Digest {name} must be {length} bytes")
        found[hashlib_name] = digest
    if not found:
        raise BadRequest(
            f"Repr-Digest names no supported algorithm ({', '.join(named)}); use sha-256 or sha-512"
        )
    return found
