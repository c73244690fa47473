"""Metrics without servers: bounded labels, the multiprocess plumbing, the settings, and the
dashboard and alert rules that refer to the metrics by name."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import falcon
import falcon.testing
import pytest
import yaml
from prometheus_client import REGISTRY

from api.metrics import RequestMetrics, problem_type
from core import metrics
from core.settings import WEB_PROCESS, WORKER_PROCESS, ConfigError, Settings

ROOT = Path(__file__).resolve().parents[2]
BASE = {"S3_ENDPOINT": "http://127.0.0.1:9000", "S3_ACCESS_KEY": "k", "S3_SECRET_KEY": "s"}


class Thing:
    def on_get(self, req: falcon.Request, resp: falcon.Response, thing_id: str) -> None:
        resp.text = thing_id


def count(route: str, method: str = "GET", status: str = "200") -> float:
    labels = {"route": route, "method": method, "status": status}
    return REGISTRY.get_sample_value("picstream_http_requests_total", labels) or 0.0


def test_an_unknown_route_is_one_label_value_and_a_known_one_its_template() -> None:
    app = falcon.App(middleware=[RequestMetrics(["/things/{thing_id}"])])
    app.add_route("/things/{thing_id}", Thing())
    client = falcon.testing.TestClient(app)
    before_known, before_unknown = count("/things/{thing_id}"), count("unmatched", status="404")
    for n in range(5):
        assert client.simulate_get(f"/things/{n}").status_code == 200
        assert client.simulate_get(f"/nowhere/{n}/x{n}").status_code == 404
    assert count("/things/{thing_id}") - before_known == 5
    assert count("unmatched", status="404") - before_unknown == 5
    exported = {s.labels.get("route") for m in REGISTRY.collect() for s in m.samples}
    assert not any(route and route.startswith(("/things/0", "/nowhere")) for route in exported)


def test_a_request_refused_before_routing_gets_the_template_its_path_matches() -> None:
    class Refuse:
        def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
            raise falcon.HTTPUnauthorized()

    app = falcon.App(middleware=[RequestMetrics(["/things/{thing_id}"]), Refuse()])
    app.add_route("/things/{thing_id}", Thing())
    before = count("/things/{thing_id}", status="401")
    assert falcon.testing.TestClient(app).simulate_get("/things/7").status_code == 401
    assert count("/things/{thing_id}", status="401") - before == 1


@pytest.mark.parametrize(
    ("given", "label"),
    [("GET", "GET"), ("PATCH", "PATCH"), ("BREW", "other"), ("get", "other")],
)
def test_methods_are_bounded(given: str, label: str) -> None:
    assert metrics.method_label(given) == label


def test_problem_slugs_and_formats_are_bounded() -> None:
    assert metrics.slug_label("too-large") == "too-large"
    assert metrics.slug_label("x" * 100) == "other"
    assert metrics.slug_label("Not A Slug") == "other"
    assert metrics.format_label("jpeg") == "jpeg"
    assert metrics.format_label("../etc") == "other"
    assert metrics.status_label(404) == "404"


def test_the_problem_type_is_read_from_the_problem_body() -> None:
    resp = falcon.Response()
    resp.content_type = "application/problem+json"
    resp.text = json.dumps({"type": "urn:picstream:problem:too-large", "detail": "5 GiB"})
    assert problem_type(resp) == "too-large"
    resp.text = json.dumps({"type": "https://elsewhere/too-large"})
    assert problem_type(resp) == "other"
    resp.content_type = "text/plain"
    assert problem_type(resp) == "other"


def run(code: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


FOLD = """
import os, glob
from core import metrics
print(metrics.shared())
pids = []
for n in range(3):
    pid = os.fork()
    if pid == 0:
        metrics.JOBS_STARTED.labels("convert").inc(n + 1)
        metrics.VARIANT_DURATION.labels("webp", "w256").observe(0.1)
        metrics.SSE_WATCHERS.inc()
        os._exit(0)
    os.waitpid(pid, 0)
    pids.append(pid)
registry = metrics.tree_registry(os.environ["PROMETHEUS_MULTIPROC_DIR"])
def get(name, labels=None):
    return registry.get_sample_value(name, labels or {})
before = (get("picstream_jobs_started_total", {"queue": "convert"}),
          get("picstream_sse_watchers"))
for pid in pids:
    metrics.retire_process(pid)
after = (get("picstream_jobs_started_total", {"queue": "convert"}),
         get("picstream_sse_watchers"),
         get("picstream_variant_encode_duration_seconds_count",
             {"format": "webp", "size": "w256"}))
where = os.environ["PROMETHEUS_MULTIPROC_DIR"]
names = sorted(os.path.basename(p) for p in glob.glob(where + "/*.db"))
print(before, after, [n for n in names if any(str(p) in n for p in pids)])
"""


def test_dead_processes_are_folded_into_the_archive_without_changing_a_counter(
    tmp_path: Path,
) -> None:
    out = run(FOLD, {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}).splitlines()
    assert out[0] == "True"  # prometheus_client saw the directory: multiprocess mode
    # Counters keep their sum (1+2+3), live gauges of the dead are gone, no file is left.
    assert out[1] == "(6.0, 3.0) (6.0, 0.0, 3.0) []"


def test_without_the_directory_a_process_counts_in_memory() -> None:
    assert run("from core import metrics; print(metrics.shared())") == "False"


def test_the_gunicorn_config_does_not_load_prometheus_client() -> None:
    """It prepares the directory in `on_starting`: loaded earlier, every worker would
    count in its own memory."""
    code = (
        "import runpy, sys; runpy.run_path('deploy/gunicorn.conf.py');"
        " print('prometheus_client' in sys.modules)"
    )
    env = {**BASE, "PICSTREAM_API_KEYS": "alice:0123456789abcdef0", "PICSTREAM_METRICS_PORT": "9"}
    assert run(code, env) == "False"


def test_metrics_settings() -> None:
    for concerns in (WEB_PROCESS, WORKER_PROCESS):
        off = Settings.from_env(BASE, concerns)
        assert (off.metrics_port, off.worker_metrics_port, off.metrics_host) == (0, 0, "127.0.0.1")
    on = Settings.from_env({**BASE, "PICSTREAM_METRICS_PORT": "9100"}, WEB_PROCESS)
    assert on.metrics_port == 9100
    with pytest.raises(ConfigError, match=r"^PICSTREAM_METRICS_PORT must differ from PORT"):
        Settings.from_env({**BASE, "PORT": "8000", "PICSTREAM_METRICS_PORT": "8000"})
    with pytest.raises(ConfigError, match=r"^PICSTREAM_WORKER_METRICS_PORT"):
        Settings.from_env(
            {**BASE, "PICSTREAM_METRICS_PORT": "9100", "PICSTREAM_WORKER_METRICS_PORT": "9100"}
        )
    with pytest.raises(ConfigError, match=r"^PICSTREAM_METRICS_PORT must be between"):
        Settings.from_env({**BASE, "PICSTREAM_METRICS_PORT": "70000"})


def defined_names() -> set[str]:
    """Every sample name picstream exports, from the families registered in this process."""
    names = {"picstream_queue_depth", "picstream_queue_scheduled_jobs"}  # asked at scrape
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    for family in REGISTRY.collect():
        if family.name.startswith("picstream_"):
            names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def test_the_dashboard_and_the_alert_rules_load_and_name_only_real_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana-dashboard.json").read_text())
    rules = yaml.safe_load((ROOT / "deploy/alerts.yml").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    alerts = [r for group in rules["groups"] for r in group["rules"]]
    assert len(exprs) >= 10 and len(alerts) >= 6
    assert all(r["alert"] and r["expr"] and r["annotations"]["summary"] for r in alerts)
    used = {n for e in exprs + [r["expr"] for r in alerts] for n in re.findall(r"picstream_\w+", e)}
    assert used <= defined_names(), used - defined_names()


def test_the_rq_methods_job_metrics_overrides_still_exist() -> None:
    """JobMetrics counts jobs by overriding rq 3.0 methods: a renamed one would silently stop
    counting."""
    from rq import Worker

    from worker.metrics import JobMetrics

    overridden = {name for name, v in vars(JobMetrics).items() if callable(v)} - {"__init__"}
    assert overridden == {
        "main_work_horse",
        "handle_job_success",
        "handle_job_failure",
        "wait_for_horse",
    }
    assert all(hasattr(Worker, name) for name in overridden)
