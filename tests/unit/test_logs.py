"""Request ids and log lines: which ids are kept, what is scrubbed, what each format writes."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from gunicorn.config import Config

from api.gunicorn_logging import gunicorn_logger
from api.requestid import accept_request_id
from core import logs
from core.settings import ConfigError, Settings

SECRETS = (
    "0123456789abcdef0123456789abcdef",  # a link signature
    "deadbeefcafe",  # X-Amz-Signature
    "AKIDEXAMPLE",  # inside X-Amz-Credential
    "alice-key-0123456789abcdef",  # an API key
    "eyJvIjoiYWxpY2UifQ",  # an upload token's claims
    "tus-secret-token",
)
LEAKY = (
    "GET /v1/images/a/original?owner=alice&expires=1&sig=0123456789abcdef0123456789abcdef",
    "https://s3/b/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIDEXAMPLE%2F2026%2Fus-east-1"
    "&X-Amz-Signature=deadbeefcafe&X-Amz-Date=1",
    "Authorization: Bearer alice-key-0123456789abcdef",
    "{'authorization': 'Bearer alice-key-0123456789abcdef'}",
    "upload with pst_eyJvIjoiYWxpY2UifQ.c2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dQ",
    "callback http://hooks/x?token=tus-secret-token&a=1",
    "/x?SIG=0123456789abcdef0123456789abcdef",
    "Max retries exceeded with url: /x?signature=deadbeefcafe (Caused by ...)",
)


@pytest.mark.parametrize(
    "sent",
    ["abc", "A-Z.a_z:0-9", "x" * 128, "01J5Z8K3Q2VFT2B8M5N7W4R6Y9", "req:42"],
)
def test_a_valid_client_id_is_kept(sent: str) -> None:
    assert accept_request_id(sent) == sent


@pytest.mark.parametrize(
    "sent",
    [None, "", "x" * 129, "a b", "a\r\nX-Evil: 1", "é", "<script>", "a/b", "a;b", "a\tb", '"q"'],
)
def test_anything_else_is_replaced_by_a_fresh_id(sent: str | None) -> None:
    made = accept_request_id(sent)
    assert made != sent and len(made) == 32 and int(made, 16) >= 0
    assert accept_request_id(sent) != made  # fresh each time


@pytest.mark.parametrize("line", LEAKY)
def test_scrub_hides_every_secret_and_keeps_the_rest(line: str) -> None:
    clean = logs.scrub(line)
    assert not any(secret in clean for secret in SECRETS), clean
    assert logs.REDACTED in clean
    assert logs.scrub(clean) == clean  # idempotent


def test_scrub_leaves_ordinary_lines_alone() -> None:
    for line in (
        "GET /v1/images/holiday/original?owner=alice&expires=17",
        "presignature=1 designation=2 tokens_left=3",
        "job 1234 (holiday): pickup=12 fork=3",
        "basic information about the bearer of news",
    ):
        assert logs.scrub(line) == line


@pytest.fixture()
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing through a handler dressed like every handler we install."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("picstream.test.logs")
    logger.handlers, logger.propagate, logger.level = [handler], False, logging.DEBUG
    # No id from an in-process request of an earlier test (falcon.testing runs the app in
    # this thread, and the id stays bound until the next request, as under gunicorn).
    with logs.request_id_bound(None):
        yield logger, out
    logger.handlers = []


def test_text_lines_carry_the_bound_request_id_and_no_secret(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = captured
    logs.dress(logger.handlers[0], "text")
    logger.info("outside")
    with logs.request_id_bound("req-1"):
        logger.warning("fetching %s", LEAKY[0])
        try:
            raise RuntimeError(f"failed at {LEAKY[1]}")
        except RuntimeError:
            logger.exception("upload %s failed", "x")
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0].endswith("INFO picstream.test.logs: outside")
    assert lines[1].endswith("request_id=req-1") and "sig=[redacted]" in lines[1]
    assert "upload x failed request_id=req-1" in text
    assert "RuntimeError: failed at" in text
    assert not any(secret in text for secret in SECRETS)


def test_json_lines_are_one_object_each(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = captured
    logs.dress(logger.handlers[0], "json")
    logger.info("plain")
    with logs.request_id_bound("req-2"):
        try:
            raise ValueError("two\nlines " + LEAKY[2])
        except ValueError:
            logger.exception("oops %s", LEAKY[0])
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"time", "level", "logger", "message", "process", "request_id"}
    assert first["request_id"] is None and first["message"] == "plain"
    assert first["level"] == "INFO" and first["logger"] == "picstream.test.logs"
    assert second["request_id"] == "req-2" and second["level"] == "ERROR"
    assert "ValueError: two\nlines" in second["exception"]
    assert not any(secret in lines[1] for secret in SECRETS)


def test_gunicorns_error_and_access_logs_are_dressed() -> None:
    """What gunicorn itself writes when an exception escapes the app, and its access line."""
    cfg = Config()
    cfg.set("accesslog", "-")
    cfg.set("errorlog", "-")
    out = io.StringIO()
    real = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = out
    try:
        glog = gunicorn_logger("json")(cfg)
        with logs.request_id_bound("req-3"):
            try:
                raise OSError("reset")
            except OSError:
                glog.exception("Error handling request %s %s", "GET", LEAKY[0].split(" ")[1])
            resp = SimpleNamespace(status="500 Internal Server Error", headers=[], sent=10)
            environ = {
                "REQUEST_METHOD": "GET",
                "RAW_URI": "/x?sig=0123456789abcdef0123456789abcdef",
                "SERVER_PROTOCOL": "HTTP/1.1",
                "PATH_INFO": "/x",
                "QUERY_STRING": "sig=0123456789abcdef0123456789abcdef",
            }
            req = SimpleNamespace(headers=[("AUTHORIZATION", "Bearer alice-key-0123456789abcdef")])
            glog.cfg.set("access_log_format", '"%(r)s" %(q)s %({authorization}i)s %(s)s')
            glog.access(resp, req, environ, _Elapsed())
    finally:
        sys.stdout, sys.stderr = real
        for name in ("gunicorn.error", "gunicorn.access"):
            logging.getLogger(name).handlers = []
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    for line in lines:
        assert json.loads(line)["request_id"] == "req-3"
        assert not any(secret in line for secret in SECRETS), line


class _Elapsed:
    seconds, microseconds = 0, 1500


def test_the_log_format_setting() -> None:
    base = {"S3_ENDPOINT": "http://127.0.0.1:8333", "S3_ACCESS_KEY": "k", "S3_SECRET_KEY": "s"}
    assert Settings.from_env(base, ()).log_format == "text"
    assert Settings.from_env({**base, "PICSTREAM_LOG_FORMAT": "JSON"}, ()).log_format == "json"
    with pytest.raises(ConfigError, match="PICSTREAM_LOG_FORMAT must be one of text, json"):
        Settings.from_env({**base, "PICSTREAM_LOG_FORMAT": "xml"}, ())
