"""Upload tokens without Redis: sealing and verifying, with a clock of our choosing, and what
a grant allows an upload (api/grants.py `resolve`, `narrowed`)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import replace

import pytest

from api.grants import Resolved, narrowed, resolve
from core.errors import InvalidToken, TokenExpired, TokenNotAllowed
from core.ingest import Limits
from core.signing import sign, verify
from core.tokens import MAX_TOKEN_LENGTH, UploadGrant, seal, token_key, unseal

SIGNING_KEY = b"signing-key-for-unit-tests-0123456789abcdef"
KEY = token_key(SIGNING_KEY)
NOW = 1_800_000_000.0
GRANT = UploadGrant(
    jti="AAAAAAAAAAAAAAAAAAAAAA",
    owner="alice",
    exp=int(NOW) + 60,
    uploads=3,
    max_bytes=1_000_000,
    formats=frozenset({"jpeg", "png"}),
    profile="default",
    image_id=None,
    callback="https://hooks.example/done",
)
LIMITS = Limits(
    part_size=5 << 20,
    max_bytes=300 << 20,
    max_pixels=100_000_000,
    max_head=2 << 20,
    allowed_formats=frozenset({"jpeg", "png", "gif", "webp"}),
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_a_sealed_grant_comes_back_whole_until_it_expires() -> None:
    token = seal(KEY, GRANT)
    assert token.startswith("pst_")
    assert unseal(KEY, token, NOW) == GRANT
    assert unseal(KEY, token, GRANT.exp - 0.001) == GRANT
    with pytest.raises(TokenExpired) as expired:
        unseal(KEY, token, GRANT.exp)
    assert expired.value.detail == "this upload token expired at 2027-01-15T08:01:00Z"
    assert GRANT.expires_at == "2027-01-15T08:01:00Z"


def test_a_token_is_url_safe_ascii_of_bounded_length() -> None:
    token = seal(KEY, replace(GRANT, callback="https://hooks.example/" + "x" * 2000))
    assert token.isascii() and " " not in token and "=" not in token
    assert len(token) < MAX_TOKEN_LENGTH


@pytest.mark.parametrize("where", ["payload", "mac"])
def test_any_changed_character_makes_it_invalid(where: str) -> None:
    token = seal(KEY, GRANT)
    payload, mac = token.removeprefix("pst_").split(".")
    for i in range(0, len(payload if where == "payload" else mac), 3):
        if where == "payload":
            flipped = payload[:i] + ("A" if payload[i] != "A" else "B") + payload[i + 1 :]
            bad = f"pst_{flipped}.{mac}"
        else:
            flipped = mac[:i] + ("A" if mac[i] != "A" else "B") + mac[i + 1 :]
            bad = f"pst_{payload}.{flipped}"
        with pytest.raises(InvalidToken):
            unseal(KEY, bad, NOW)


def test_changed_claims_with_the_old_mac_are_refused() -> None:
    """A bearer raising its own limits: the MAC no longer holds."""
    token = seal(KEY, GRANT)
    payload, mac = token.removeprefix("pst_").split(".")
    claims = json.loads(unb64(payload))
    claims["uploads"] = 1000
    claims["owner"] = "bob"
    forged = f"pst_{b64(json.dumps(claims).encode())}.{mac}"
    with pytest.raises(InvalidToken):
        unseal(KEY, forged, NOW)


def test_a_token_of_another_signing_key_is_invalid() -> None:
    other = token_key(b"another-signing-key-0123456789abcdefgh")
    with pytest.raises(InvalidToken):
        unseal(KEY, seal(other, GRANT), NOW)


def test_token_macs_and_link_signatures_never_stand_in_for_each_other() -> None:
    """Domain separation: a token is MACed with a key derived for tokens alone, over a
    labelled message, so no signed-link MAC (HMAC of the signing key over `GET\\n...`) is a
    token MAC, and no token MAC verifies as a link."""
    token = seal(KEY, GRANT)
    payload, mac = token.removeprefix("pst_").split(".")
    # What the signing key itself gives over the same text (a link-signing oracle):
    raw = hmac.new(SIGNING_KEY, payload.encode(), hashlib.sha256).digest()
    with pytest.raises(InvalidToken):
        unseal(KEY, f"pst_{payload}.{b64(raw)}", NOW)
    # Nor is the token's MAC (in any encoding) a link signature.
    path = "/v1/images/holiday-1/original"
    for sig in (mac, unb64(mac).hex()):
        assert not verify(SIGNING_KEY, path, "alice", str(GRANT.exp), sig, now=NOW)
    # A real link signature, put where a token's MAC goes, is refused too.
    query = sign(SIGNING_KEY, path, "alice", 60, now=NOW)
    link_sig = bytes.fromhex(query.rsplit("sig=", 1)[1])
    with pytest.raises(InvalidToken):
        unseal(KEY, f"pst_{payload}.{b64(link_sig)}", NOW)
    # And the token key itself differs from the signing key.
    assert token_key(SIGNING_KEY) != SIGNING_KEY


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "pst_",
        "pst_.",
        "pst_abc",
        "pst_abc.def",
        "pst_a.b.c",
        "pst_é." + "A" * 43,
        "pst_abc." + "A" * 42,
        "pst_abc." + "A" * 44,
        "xyz_abc." + "A" * 43,
        "pst_" + "A" * MAX_TOKEN_LENGTH + "." + "A" * 43,
        "pst_abc\n." + "A" * 43,
    ],
)
def test_malformed_tokens_are_invalid(bad: str) -> None:
    with pytest.raises(InvalidToken) as refused:
        unseal(KEY, bad, NOW)
    assert "pst_" not in refused.value.detail


def test_claims_of_another_shape_under_a_good_mac_are_invalid() -> None:
    """Our own MAC over claims this version cannot read (a future format) is refused, not
    half-read."""
    for claims in ({**GRANT.claims(), "extra": 1}, {**GRANT.claims(), "uploads": "3"}, [1]):
        payload = b64(json.dumps(claims).encode())
        mac = hmac.new(KEY, b"picstream/upload-token/v1\n" + payload.encode(), hashlib.sha256)
        with pytest.raises(InvalidToken):
            unseal(KEY, f"pst_{payload}.{b64(mac.digest())}", NOW)


def test_resolve_fills_in_what_the_token_fixes_and_refuses_anything_else() -> None:
    assert resolve(None, image_id="x", profile=None, callback="https://a/") == Resolved(
        "x", None, "https://a/"
    )
    free = replace(GRANT, profile=None, callback=None)
    assert resolve(free, image_id=None, profile="thumbs", callback=None) == Resolved(
        None, "thumbs", None
    )
    bound = replace(GRANT, image_id="avatar-7")
    assert resolve(bound, image_id=None, profile=None, callback=None) == Resolved(
        "avatar-7", "default", "https://hooks.example/done"
    )
    assert resolve(
        bound, image_id="avatar-7", profile="default", callback="https://hooks.example/done"
    ) == Resolved("avatar-7", "default", "https://hooks.example/done")
    for asked in (
        {"image_id": "other", "profile": None, "callback": None},
        {"image_id": None, "profile": "thumbs", "callback": None},
        {"image_id": None, "profile": None, "callback": "https://hooks.example/other"},
    ):
        with pytest.raises(TokenNotAllowed) as refused:
            resolve(bound, **asked)
        assert "other" not in refused.value.detail and "thumbs" not in refused.value.detail


def test_narrowed_limits_are_within_both() -> None:
    assert narrowed(LIMITS, None) is LIMITS
    small = narrowed(LIMITS, GRANT)
    assert small.max_bytes == 1_000_000
    assert small.allowed_formats == frozenset({"jpeg", "png"})
    assert (small.part_size, small.max_pixels, small.max_head) == (
        LIMITS.part_size,
        LIMITS.max_pixels,
        LIMITS.max_head,
    )
    # A token never widens the deployment's limits (they may have shrunk since it was minted).
    wide = replace(GRANT, max_bytes=10 << 30, formats=frozenset({"jpeg", "bmp"}))
    assert narrowed(LIMITS, wide).max_bytes == LIMITS.max_bytes
    assert narrowed(LIMITS, wide).allowed_formats == frozenset({"jpeg"})
