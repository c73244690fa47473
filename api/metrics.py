"""Request metrics of the API (the metrics themselves are defined in core/metrics.py).

`RequestMetrics` is the first middleware, so it times every request, also those refused
before routing (CORS preflights, a missing key). Its labels are bounded: the route template
(`/v1/images/{image_id}`), never the path, and `unmatched` for a path no route knows — a
request refused before routing is labelled with the template its path matches; the method
(`other` for a made-up one); the status code; an upload's problem type, read from the
problem body api/errors.py wrote.

The metrics are served on a listener of their own (deploy/gunicorn.conf.py: loopback by
default, PICSTREAM_METRICS_PORT), never by this application: /metrics here is a 404.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import falcon
from falcon.routing import CompiledRouter

from api.errors import PROBLEM_JSON, TYPE_PREFIX
from core import metrics

# Requests that carry an upload's body: (method, route template).
UPLOADS = frozenset(
    {
        ("POST", "/v1/images"),
        ("PUT", "/v1/images/{image_id}"),
        ("PATCH", "/v1/tus/{upload_id}"),
    }
)
# Routes whose answers are image bytes relayed from the store.
DOWNLOADS = frozenset(
    {
        "/v1/images/{image_id}/original",
        "/v1/images/{image_id}/variants/{name}",
        "/v1/images/{image_id}/best",
    }
)
_STARTED = "metrics.started"


class RequestMetrics:
    """falcon middleware: requests by route/method/status and their duration; upload
    outcomes; relayed download bytes. `routes` are the app's route templates."""

    def __init__(self, routes: Iterable[str]) -> None:
        self.router = CompiledRouter()
        for template in routes:
            self.router.add_route(template, template)  # the "resource" is its template

    def route_of(self, req: falcon.Request) -> str:
        """The route template of the request: falcon's once routed, else the template its
        path matches (a request refused before routing), else `unmatched`."""
        if req.uri_template:
            return req.uri_template
        found = self.router.find(req.path)
        return str(found[0]) if found else metrics.UNMATCHED

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context[_STARTED] = time.perf_counter()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, succeeded: bool
    ) -> None:
        started = req.context.get(_STARTED)
        took = time.perf_counter() - started if started is not None else 0.0
        route = self.route_of(req)
        method = metrics.method_label(req.method)
        status = metrics.status_label(resp.status_code)
        metrics.REQUESTS.labels(route, method, status).inc()
        metrics.REQUEST_DURATION.labels(route, method).observe(took)
        if (req.method, route) in UPLOADS:
            self._upload(resp, status, took)
        elif route in DOWNLOADS and req.method == "GET" and status in ("200", "206"):
            self._download(resp, route)

    @staticmethod
    def _upload(resp: falcon.Response, status: str, took: float) -> None:
        if status.startswith("2"):
            metrics.UPLOAD_DURATION.labels("accepted").observe(took)
            return
        metrics.UPLOAD_DURATION.labels("rejected").observe(took)
        metrics.UPLOADS_REJECTED.labels(problem_type(resp)).inc()

    @staticmethod
    def _download(resp: falcon.Response, route: str) -> None:
        if resp.get_header("X-Accel-Redirect"):
            return  # nginx sends the bytes
        length = resp.get_header("Content-Length")
        if length and length.isdigit():
            metrics.DOWNLOAD_BYTES.labels(route).inc(int(length))


def problem_type(resp: falcon.Response) -> str:
    """The slug of the problem an error answer carries (`too-large`), `other` when the
    answer is not a problem document."""
    if resp.content_type != PROBLEM_JSON or not isinstance(resp.text, str):
        return metrics.OTHER
    try:
        kind = json.loads(resp.text).get("type", "")
    except (ValueError, AttributeError):
        return metrics.OTHER
    if not isinstance(kind, str) or not kind.startswith(TYPE_PREFIX):
        return metrics.OTHER
    return metrics.slug_label(kind.removeprefix(TYPE_PREFIX))
