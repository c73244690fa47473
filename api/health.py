"""Health checks, answered without a key: is the process alive, do Redis and S3 answer."""

from __future__ import annotations

import falcon

from api.errors import problem, respond_problem
from core.errors import PicstreamError
from core.records import Records
from core.storage import Store


class Health:
    """/healthz: the process is alive. No dependencies checked, no auth."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class Ready:
    """/readyz: Redis and S3 answer. 503 (problem+json) naming what is down otherwise."""

    def __init__(self, records: Records, store: Store) -> None:
        self.records = records
        self.store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        checks: dict[str, str] = {}
        for name, ping in (("redis", self.records.ping), ("s3", self.store.ping)):
            try:
                ping()
                checks[name] = "ok"
            except PicstreamError as exc:
                checks[name] = exc.detail
        if all(v == "ok" for v in checks.values()):
            resp.media = {"status": "ok", "checks": checks}
            return
        down = ", ".join(k for k, v in checks.items() if v != "ok")
        body = problem(503, "not-ready", "Not ready", f"unreachable: {down}")
        respond_problem(resp, {**body, "checks": checks})
