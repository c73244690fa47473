"""Request ids: `X-Request-Id` on every answer, in every log line and problem body.

A client (or nginx in front, deploy/nginx.conf) may send `X-Request-Id`; a value of 1-128
characters from `A-Z a-z 0-9 . _ : -` is kept, anything else is replaced by a fresh id and
never echoed (a header or log line must not carry what a client chose to inject). The id is
bound for the request's log lines (core/logs.py), goes into the jobs the request queues
(core/jobs.py) and into problem bodies (api/errors.py), and comes back on the answer —
successes, problems, falcon's own 404/405, CORS preflights, event streams.

Middleware, first in the list: it runs before a preflight or an authentication failure
ends the request. The id stays bound while a streamed body is sent; gunicorn's
`post_request` hook (deploy/gunicorn.conf.py) unbinds it once the access line is written.
"""

from __future__ import annotations

import uuid

import falcon

from core.logs import REQUEST_ID_RE, bind_request_id

HEADER = "X-Request-Id"


def accept_request_id(sent: str | None) -> str:
    """The client's id if it is one we may repeat, else a new one (32 hex digits)."""
    if sent is not None and REQUEST_ID_RE.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


class RequestIds:
    """Falcon middleware: takes or makes the request's id, binds it, answers with it."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        request_id = accept_request_id(req.get_header(HEADER))
        req.context.request_id = request_id
        bind_request_id(request_id)
        resp.set_header(HEADER, request_id)

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        # Again: an error handler may have rebuilt the answer's headers.
        request_id = req.context.get("request_id")
        if request_id is not None:
            resp.set_header(HEADER, request_id)
