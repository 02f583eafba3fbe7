"""Channels against real receivers on loopback: an HTTP server for the webhook and the
Slack-compatible webhook, an SMTP server (aiosmtpd) for e-mail."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import ValidationError

from loopline.monitor import channels
from loopline.monitor.channels import AlertNotice, notify, render_subject, render_text
from loopline.monitor.config import ChannelConfig

SECRET = "s3cr3t-token-value"


def _alert(**changes: Any) -> dict[str, Any]:
    alert = {
        "id": 17,
        "rule": "accuracy-low",
        "metric": "accuracy",
        "environment": "production",
        "model_name": "vehicles",
        "model_version": 3,
        "scope": "global",
        "severity": "critical",
        "state": "firing",
        "op": "<",
        "threshold": 0.4,
        "value": 0.3421,
        "samples": 50,
        "action": "approve",
        "started_at": "2024-05-01T10:00:00+00:00",
        "fired_at": "2024-05-01T10:00:05+00:00",
        "resolved_at": None,
        "reason": None,
    }
    alert.update(changes)
    return alert


def _notice(**changes: Any) -> AlertNotice:
    return AlertNotice(
        alert=_alert(**changes),
        kind=changes.get("state", "firing"),
        message="accuracy fell after the fog set in",
        owner="qa@example.com",
        details={"window": "last 50 labelled predictions"},
    )


# -- a real HTTP receiver ---------------------------------------------------------------------
class Receiver:
    """An HTTP server on 127.0.0.1 that records every request and answers the statuses
    it is given, in order (then 200)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses = list(statuses or [])
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok" if status < 400 else f"boom {SECRET}".encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channels, "RETRY_BACKOFF_S", 0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- text -------------------------------------------------------------------------------------
def test_text_says_what_value_threshold_window_version_and_how_to_approve() -> None:
    notice = _notice()
    assert render_subject(notice) == "[Loopline] critical accuracy-low firing vehicles:3"
    text = render_text(notice)
    lines = text.splitlines()
    assert lines[0] == render_subject(notice)
    assert "What: accuracy < 0.4 on production vehicles:3, scope global" in lines
    assert "Value: 0.3421 over 50 samples (threshold < 0.4)" in lines
    assert "Window: last 50 labelled predictions" in lines
    assert "`loopline approve 17`" in text and "`loopline reject 17 --reason ...`" in text
    assert "Owner: qa@example.com" in lines


def test_subject_names_a_segment_and_a_kind_beyond_the_state() -> None:
    notice = AlertNotice(
        alert=_alert(scope="camera_id=cam-2", action="retrain"),
        kind="retrain-rejected",
        message="candidate 0.61 < incumbent 0.64",
    )
    subject = render_subject(notice)
    assert subject == (
        "[Loopline] critical accuracy-low firing vehicles:3 camera_id=cam-2 (retrain-rejected)"
    )
    assert "production stays on the incumbent" in render_text(notice)


def test_log_channel_logs_by_severity_and_returns_the_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="loopline.monitor.alerts")
    log = [ChannelConfig(kind="log")]
    [critical] = notify(log, _notice())
    [warning] = notify(log, _notice(severity="warning"))
    [resolved] = notify(log, _notice(state="resolved"))
    assert critical["ok"] and critical["channel"] == "log"
    assert critical["text"].startswith("[Loopline] critical accuracy-low firing vehicles:3")
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels == [
        (logging.ERROR, critical["text"]),
        (logging.WARNING, warning["text"]),
        (logging.INFO, resolved["text"]),
    ]


def test_min_severity_skips_a_channel(receiver: Receiver) -> None:
    pager = ChannelConfig(kind="webhook", url=receiver.url, min_severity="critical")
    [result] = notify([pager], _notice(severity="warning"))
    assert result == {
        "channel": "webhook",
        "kind": "webhook",
        "ok": True,
        "error": None,
        "skipped": True,
    }
    assert receiver.requests == []
    [sent] = notify([pager], _notice(severity="critical"))
    assert sent["ok"] and not sent.get("skipped") and len(receiver.requests) == 1


# -- webhook and slack ------------------------------------------------------------------------
def test_webhook_posts_the_alert_as_json_with_expanded_headers(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_AUTH", f"Bearer {SECRET}")
    monkeypatch.setenv("HOOK_TEAM", "qa")
    monkeypatch.setenv("HOOK_URL", f"{receiver.url}/hooks/qa")
    channel = ChannelConfig(
        kind="webhook",
        name="qa",
        url="${HOOK_URL}",
        headers={"Authorization": "${HOOK_AUTH}", "X-Team": "${HOOK_TEAM}"},
    )
    notice = _notice()
    [result] = notify([channel], notice)
    assert result["ok"] and result["error"] is None and result["status"] == 200
    assert result["channel"] == "qa" and result["attempts"] == 1
    [request] = receiver.requests
    assert request["path"] == "/hooks/qa"
    assert request["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert request["headers"]["X-Team"] == "qa"
    assert request["headers"]["Content-Type"] == "application/json"
    body = json.loads(request["body"])
    assert body["alert"] == notice.alert
    assert body["kind"] == "firing" and body["owner"] == "qa@example.com"
    assert body["message"] == "accuracy fell after the fog set in"
    assert body["text"] == render_text(notice)
    assert SECRET not in json.dumps(result)


def test_slack_posts_mrkdwn_text(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_URL", f"{receiver.url}/services/T0/B0/XYZ")
    channel = ChannelConfig(kind="slack", url="${SLACK_URL}")
    [result] = notify([channel], _notice(rule="p95 <fast> & cheap"))
    assert result["ok"], result
    assert receiver.requests[0]["path"] == "/services/T0/B0/XYZ"
    body = json.loads(receiver.requests[0]["body"])
    assert list(body) == ["text"]
    text = body["text"]
    assert text.startswith("*[Loopline] critical p95 &lt;fast&gt; &amp; cheap firing vehicles:3*")
    assert "*Value:* 0.3421 over 50 samples (threshold &lt; 0.4)" in text
    assert "`loopline approve 17`" in text


def test_a_500_is_retried_once() -> None:
    flaky = Receiver(statuses=[500])
    try:
        [result] = notify([ChannelConfig(kind="webhook", url=flaky.url)], _notice())
    finally:
        flaky.close()
    assert result["ok"] and result["attempts"] == 2
    assert len(flaky.requests) == 2
    assert flaky.requests[0]["body"] == flaky.requests[1]["body"]


def test_two_500s_fail_without_the_secret_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    down = Receiver(statuses=[500, 503])
    monkeypatch.setenv("HOOK_TOKEN", SECRET)
    channel = ChannelConfig(kind="webhook", url=down.url + "/hook?token=${HOOK_TOKEN}")
    try:
        [result] = notify([channel], _notice())
    finally:
        down.close()
    assert not result["ok"] and result["attempts"] == 2
    assert "answered 503" in result["error"] and "after 2 attempt(s)" in result["error"]
    assert "${HOOK_TOKEN}" in result["error"]  # the reference is shown, never its value
    assert SECRET not in json.dumps(result)  # not even the receiver's echo of it


def test_a_4xx_is_not_retried(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    receiver.statuses = [404, 404]
    monkeypatch.setenv("SLACK_URL", receiver.url + "/services/T0/B0/XYZ")
    hooks = [
        ChannelConfig(kind="slack", url="${SLACK_URL}"),
        ChannelConfig(kind="webhook", url=receiver.url + "/T0/B0/XYZ"),
    ]
    slack, webhook = notify(hooks, _notice())
    assert len(receiver.requests) == 2
    for result in (slack, webhook):
        assert not result["ok"] and result["attempts"] == 1
        assert "XYZ" not in result["error"]
    # The URL is shown as configured: by its reference, never its value.
    assert "POST ${SLACK_URL} answered 404" in slack["error"]
    # A literal URL with a path may be a secret in itself: only its origin is shown.
    assert f"POST {receiver.url}/… answered 404" in webhook["error"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"kind": "webhook", "url": "http://127.0.0.1/h", "headers": {"X-Token": "abc"}},
            "header 'X-Token': write its value as an environment reference, e.g. "
            "${WEBHOOK_TOKEN}: a literal would be stored with every run's config",
        ),
        (  # a reference inside a literal is still a literal around it
            {"kind": "webhook", "url": "http://h/", "headers": {"Authorization": "Bearer ${T}"}},
            "header 'Authorization': write its value as an environment reference",
        ),
        (
            {"kind": "slack", "url": "https://hooks.slack.com/services/T0/B0/XYZ"},
            "a Slack webhook URL is itself a secret: write it as an environment "
            "reference, e.g. ${SLACK_WEBHOOK_URL}",
        ),
    ],
)
def test_a_literal_header_value_or_slack_url_is_refused(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        ChannelConfig(**fields)
    [error] = caught.value.errors()
    assert error["msg"].startswith(f"Value error, {message}")
    assert "\n" not in error["msg"]
    assert "XYZ" not in error["msg"] and "abc" not in error["msg"]


def test_an_unreachable_receiver_is_a_failed_result_not_an_exception() -> None:
    url = f"http://127.0.0.1:{_free_port()}/hook"
    results = notify([ChannelConfig(kind="webhook", url=url), ChannelConfig(kind="log")], _notice())
    assert [r["ok"] for r in results] == [False, True]
    assert "cannot connect" in results[0]["error"] and results[0]["attempts"] == 2


def test_a_missing_environment_variable_fails_that_channel_only(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOT_SET_HOOK_URL", raising=False)
    results = notify(
        [
            ChannelConfig(kind="webhook", name="qa", url="${NOT_SET_HOOK_URL}"),
            ChannelConfig(kind="webhook", url=receiver.url),
        ],
        _notice(),
    )
    assert [r["ok"] for r in results] == [False, True]
    assert "${NOT_SET_HOOK_URL}" in results[0]["error"]
    assert "not set in the environment" in results[0]["error"]


# -- e-mail -----------------------------------------------------------------------------------
class Mailbox:
    """Records what an aiosmtpd server receives, and the logins it sees."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.logins: list[tuple[str, str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(
            {
                "from": envelope.mail_from,
                "to": list(envelope.rcpt_tos),
                "message": message_from_bytes(envelope.content, policy=default_policy),
            }
        )
        return "250 OK"

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> Any:
        from aiosmtpd.smtp import AuthResult

        login, password = auth_data.login.decode(), auth_data.password.decode()
        self.logins.append((mechanism, login))
        ok = (login, password) == ("loopline", SECRET)
        return AuthResult(success=ok, handled=False)  # not handled: the server answers 535


@pytest.fixture
def smtp_server(request: pytest.FixtureRequest) -> Iterator[tuple[Mailbox, int]]:
    from aiosmtpd.controller import Controller

    auth = getattr(request, "param", False)
    mailbox = Mailbox()
    port = _free_port()
    kwargs: dict[str, Any] = {}
    if auth:  # AUTH LOGIN only (smtplib would pick PLAIN first), over plain TCP on loopback
        kwargs = {
            "authenticator": mailbox.authenticate,
            "auth_required": True,
            "auth_require_tls": False,
            "auth_exclude_mechanism": ["PLAIN"],
        }
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    try:
        yield mailbox, port
    finally:
        controller.stop()


def _email(port: int, **changes: Any) -> ChannelConfig:
    fields: dict[str, Any] = {
        "kind": "email",
        "host": "127.0.0.1",
        "port": port,
        "sender": "loopline@example.com",
        "to": ["qa@example.com", "owner@example.com"],
    }
    return ChannelConfig(**{**fields, **changes})


def test_email_is_delivered_with_subject_recipients_and_body(
    smtp_server: tuple[Mailbox, int],
) -> None:
    mailbox, port = smtp_server
    notice = _notice()
    [result] = notify([_email(port)], notice)
    assert result["ok"], result
    assert result["recipients"] == ["qa@example.com", "owner@example.com"]
    [received] = mailbox.messages
    assert received["from"] == "loopline@example.com"
    assert received["to"] == ["qa@example.com", "owner@example.com"]
    message: EmailMessage = received["message"]
    assert message["Subject"] == "[Loopline] critical accuracy-low firing vehicles:3"
    assert message["To"] == "qa@example.com, owner@example.com"
    body = message.get_content().replace("\r\n", "\n")  # SMTP's line ends
    assert body == render_text(notice)
    assert "loopline approve 17" in body


@pytest.mark.parametrize("smtp_server", [True], indirect=True)
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_email_logs_in_with_the_password_from_the_environment(
    smtp_server: tuple[Mailbox, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    mailbox, port = smtp_server
    monkeypatch.setenv("SMTP_PASSWORD", SECRET)
    [result] = notify([_email(port, username="loopline", password="${SMTP_PASSWORD}")], _notice())
    assert result["ok"], result
    assert mailbox.logins == [("LOGIN", "loopline")]
    assert len(mailbox.messages) == 1

    monkeypatch.setenv("SMTP_PASSWORD", "wrong-" + SECRET)
    [refused] = notify([_email(port, username="loopline", password="${SMTP_PASSWORD}")], _notice())
    assert not refused["ok"] and "535" in refused["error"]
    assert SECRET not in refused["error"]
    assert len(mailbox.messages) == 1

    [anonymous] = notify([_email(port)], _notice())  # the server requires AUTH
    assert not anonymous["ok"] and "530" in anonymous["error"]


def test_email_failures_are_results(
    smtp_server: tuple[Mailbox, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    mailbox, port = smtp_server
    monkeypatch.delenv("NOT_SET_SMTP_PASSWORD", raising=False)
    results = notify(
        [
            _email(port, starttls=True),  # this server offers no STARTTLS
            _email(port, username="u", password="${NOT_SET_SMTP_PASSWORD}"),
            _email(_free_port()),
            _email(port, name="ok"),
        ],
        _notice(),
    )
    assert [r["ok"] for r in results] == [False, False, False, True]
    assert "STARTTLS" in results[0]["error"]
    assert "${NOT_SET_SMTP_PASSWORD}" in results[1]["error"]
    assert results[2]["error"].startswith("email channel 'email': ")
    assert len(mailbox.messages) == 1


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LocalHost.", True),
        ("10.0.0.1", False),
        ("128.0.0.1", False),
        ("::2", False),
        ("smtp.example.com", False),
        ("localhost.example.com", False),
        ("127.0.0.1.nip.io", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert channels._is_loopback(host) is loopback


def test_email_refuses_to_log_in_in_clear_text_to_a_remote_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SMTP_PASSWORD", SECRET)
    login = {"username": "loopline", "password": "${SMTP_PASSWORD}"}
    # smtp.invalid never resolves: an error about it other than the refusal would mean a
    # connection was attempted before refusing.
    plain, anonymous, tls = notify(
        [
            _email(25, host="smtp.invalid", name="plain", **login),
            _email(25, host="smtp.invalid", name="anonymous"),
            _email(587, host="smtp.invalid", name="tls", starttls=True, **login),
        ],
        _notice(),
    )
    assert not plain["ok"]
    assert plain["error"] == (
        "email channel 'plain': refusing to log in to smtp.invalid:25 in clear text; set "
        "ssl: true (usually port 465) or starttls: true (usually port 587); only a loopback "
        "host (localhost, 127.0.0.0/8, ::1) may log in without them"
    )
    assert SECRET not in json.dumps(plain)
    # Without a login, or with STARTTLS, it goes on to connect (and fails on the name).
    for result in (anonymous, tls):
        assert not result["ok"] and "refusing" not in result["error"]
        assert result["error"].startswith(f"email channel {result['channel']!r}: ")


@pytest.mark.parametrize("smtp_server", [True], indirect=True)
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_email_logs_in_in_clear_text_to_a_loopback_relay(
    smtp_server: tuple[Mailbox, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    mailbox, port = smtp_server
    monkeypatch.setenv("SMTP_PASSWORD", SECRET)
    channel = _email(port, username="loopline", password="${SMTP_PASSWORD}")
    assert not channel.ssl and not channel.starttls and channel.host == "127.0.0.1"
    [result] = notify([channel], _notice())
    assert result["ok"], result
    assert mailbox.logins == [("LOGIN", "loopline")] and len(mailbox.messages) == 1
