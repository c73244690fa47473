"""Making signed links (`?signed=SECONDS` on a record or its events); core/signing.py has
the format and api/auth.py checks them on the way in."""

from __future__ import annotations

from collections.abc import Callable

import falcon

from core.errors import BadRequest
from core.signing import sign

Signer = Callable[[str], str]  # path -> query string that makes it readable without a key

# The longest a signed link may live: a week.
MAX_TTL = 7 * 86_400


class SignedLinks:
    def __init__(self, signing_key: bytes | None) -> None:
        self.key = signing_key

    def signer(self, req: falcon.Request) -> Signer | None:
        """With `?signed=SECONDS`, a signer for links of the request's owner valid that long;
        None without it; BadRequest when this deployment has no signing key."""
        ttl = req.get_param_as_int("signed", min_value=1, max_value=MAX_TTL)
        if ttl is None:
            return None
        key = self.key
        if key is None:
            raise BadRequest("signed links are not enabled here (PICSTREAM_SIGNING_KEY is not set)")
        owner = req.context.owner
        return lambda path: sign(key, path, owner, ttl)
