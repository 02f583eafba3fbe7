"""Where an alert's transitions are told: the monitor's log, a JSON webhook, a
Slack-compatible incoming webhook, or e-mail over SMTP.

``notify`` sends one notice to every channel and returns one result per channel
(``{"channel", "kind", "ok", "error", ...}``); it never raises, so a channel that is down
never stops a monitoring pass. ``${ENV}`` references in URLs, header values, the user name
and the password are expanded only when sending, and no secret appears in a result, an
error or the log: errors name the URL as configured (its references, not their values) or
only its origin. E-mail logs in only over ``ssl`` or ``starttls``, or to a loopback relay;
otherwise the channel fails before connecting, so no password crosses the network in clear.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import smtplib
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any
from urllib.parse import urlsplit

from loopline.credentials import expand_url, mask_url, scrub, url_secrets
from loopline.monitor.config import SEVERITIES, ChannelConfig

logger = logging.getLogger("loopline.monitor.alerts")

RETRY_BACKOFF_S = 0.5  # before the one retry of an HTTP post (connection error or 5xx)
_SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}
_LOG_LEVEL = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}
_GOOD_NEWS = ("resolved", "redeployed")  # logged at INFO whatever the severity
_ENV_NAME = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_USER_AGENT = "loopline-monitor"


@dataclass
class AlertNotice:
    """One thing to tell about an alert.

    Attributes:
        alert: the alert as ``AlertRecord.to_dict()`` gives it (id, rule, metric,
            environment, model_name, model_version, scope, severity, state, op, threshold,
            value, samples, action, started_at, fired_at, resolved_at, reason, ...).
        kind: what happened: ``pending``, ``firing``, ``resolved``, ``retrain-started``,
            ``retrain-rejected``, ``awaiting-approval``, ``redeployed``, ...
        message: a sentence from whoever sends it (the loop's outcome, a reason).
        owner: who is told (``monitor.owner``), named in the message.
        details: anything else worth sending (window, evidence, loop id); JSON-ready.
        links: named URLs (a report, a dashboard).
    """

    alert: dict[str, Any]
    kind: str
    message: str = ""
    owner: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)

    @property
    def severity(self) -> str:
        severity = str(self.alert.get("severity") or "info")
        return severity if severity in _SEVERITY_RANK else "info"

    def payload(self) -> dict[str, Any]:
        """The JSON a webhook receives."""
        return {
            "alert": self.alert,
            "kind": self.kind,
            "message": self.message,
            "owner": self.owner,
            "subject": render_subject(self),
            "text": render_text(self),
            "details": self.details,
            "links": self.links,
        }


# -- text -------------------------------------------------------------------------------------
def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _when(value: Any) -> str | None:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value) if value else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def render_subject(notice: AlertNotice) -> str:
    """``[Loopline] <severity> <rule> <state> <model:version>``, then the scope when it is
    a segment and the kind when it says more than the state."""
    a = notice.alert
    state = str(a.get("state") or notice.kind)
    subject = (
        f"[Loopline] {notice.severity} {a.get('rule', '?')} {state} "
        f"{a.get('model_name', '?')}:{a.get('model_version', '?')}"
    )
    scope = a.get("scope")
    if scope and scope != "global":
        subject += f" {scope}"
    if notice.kind != state:
        subject += f" ({notice.kind})"
    return _one_line(subject)


def _next_step(notice: AlertNotice) -> str:
    a = notice.alert
    alert_id, action, kind = a.get("id", "ID"), a.get("action"), notice.kind
    show = f"`loopline alerts show {alert_id}`"
    if kind == "resolved":
        return "nothing: the alert is resolved."
    if kind == "pending":
        return "it fires if the condition still holds at the end of the pending period."
    if kind == "redeployed":
        return f"nothing: the new version serves; the monitor watches it. Lineage: {show}."
    if kind == "retrain-rejected":
        return f"production stays on the incumbent version. Lineage: {show}."
    if kind == "awaiting-approval" or (action == "approve" and kind == "firing"):
        return (
            f"the loop waits for approval: `loopline approve {alert_id}` "
            f"(or `loopline reject {alert_id} --reason ...`)."
        )
    if kind == "retrain-started" or (action == "retrain" and kind == "firing"):
        return (
            "Loopline retrains on the labelled production data, gates the candidate against "
            "the incumbent, tests it in the replica and releases it "
            f"({notice.details.get('strategy') or 'as monitor.retrain.strategy says'}). "
            f"Follow: {show}."
        )
    return f"no automatic action; look at {show}."


def _lines(notice: AlertNotice) -> list[tuple[str, str]]:
    a = notice.alert
    lines = [
        (
            "What",
            f"{a.get('metric', '?')} {a.get('op', '')} {_num(a.get('threshold'))} "
            f"on {a.get('environment', '?')} {a.get('model_name', '?')}:"
            f"{a.get('model_version', '?')}, scope {a.get('scope', 'global')}",
        ),
        (
            "Value",
            f"{_num(a.get('value'))} over {_num(a.get('samples'))} samples "
            f"(threshold {a.get('op', '')} {_num(a.get('threshold'))})",
        ),
    ]
    window = notice.details.get("window") or (a.get("details") or {}).get("window")
    if window:
        lines.append(("Window", str(window)))
    times = [
        f"{name} {_when(a.get(key))}"
        for name, key in (
            ("started", "started_at"),
            ("fired", "fired_at"),
            ("resolved", "resolved_at"),
        )
        if _when(a.get(key))
    ]
    if times:
        lines.append(("When", ", ".join(times)))
    if notice.message:
        lines.append(("Message", notice.message))
    if a.get("reason"):
        lines.append(("Reason", str(a["reason"])))
    lines.append(("Next", _next_step(notice)))
    if notice.owner:
        lines.append(("Owner", notice.owner))
    lines += [(name.capitalize(), url) for name, url in notice.links.items()]
    return [(label, _one_line(text)) for label, text in lines]


def render_text(notice: AlertNotice) -> str:
    """The subject line, then what, value against threshold, window, what happens next
    and how to approve: the body of an e-mail and of the webhook's ``text``."""
    body = [f"{label}: {text}" for label, text in _lines(notice)]
    return "\n".join([render_subject(notice), *body]) + "\n"


def render_slack(notice: AlertNotice) -> str:
    """``render_text`` in Slack's mrkdwn: a bold subject, bold labels, ``&<>`` escaped."""

    def esc(text: str) -> str:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    body = [f"*{label}:* {esc(text)}" for label, text in _lines(notice)]
    return "\n".join([f"*{esc(render_subject(notice))}*", *body])


def render_line(notice: AlertNotice) -> str:
    """One line for the log: the subject, value against threshold, what happens next."""
    a = notice.alert
    line = (
        f"{render_subject(notice)}: {a.get('metric', '?')}={_num(a.get('value'))} "
        f"{a.get('op', '')} {_num(a.get('threshold'))} over {_num(a.get('samples'))} samples; "
        f"next: {_next_step(notice)}"
    )
    if notice.message:
        line += f" {notice.message}"
    return _one_line(line)


# -- sending ----------------------------------------------------------------------------------
class _Secrets:
    """Expands ``${ENV}`` references and remembers every secret value to scrub from errors."""

    def __init__(self, channel: ChannelConfig) -> None:
        self.label = channel.label
        self.values: list[str] = []

    def expand(self, value: str, what: str) -> str:
        expanded = expand_url(value, f"channel {self.label!r} {what}")
        self.values += [os.environ[name] for name in _ENV_NAME.findall(value)]
        self.values += url_secrets(expanded)
        if expanded != value:
            self.values.append(expanded)
        return expanded

    def scrub(self, text: str) -> str:
        # Longest first, so a whole expanded URL goes before the token inside it.
        return scrub(text, *sorted(set(self.values), key=len, reverse=True))


def _shown_url(configured: str, expanded: str) -> str:
    """The URL as an error may show it: as configured when it names its secrets by
    reference, else only its origin (an incoming-webhook URL is a secret in itself)."""
    if "${" in configured:
        return mask_url(configured)
    parts = urlsplit(expanded)
    host = parts.hostname or "?"
    origin = f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
    return origin + ("/…" if parts.path not in ("", "/") or parts.query else "")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _post(
    channel: ChannelConfig, body: dict[str, Any], timeout: float, secrets: _Secrets
) -> dict[str, Any]:
    import httpx

    assert channel.url is not None  # the config requires one for webhook and slack
    url = secrets.expand(channel.url, "url")
    secrets.values.append(url)  # an incoming-webhook URL is a secret in itself
    headers = {"Content-Type": "application/json", "User-Agent": _USER_AGENT}
    for key, value in channel.headers.items():
        headers[key] = secrets.expand(value, f"header {key}")
    content = json.dumps(body, default=_json_default).encode()
    shown = _shown_url(channel.url, url)
    error = None
    attempts = 0
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        for attempt in (1, 2):
            attempts = attempt
            try:
                response = client.post(url, content=content, headers=headers)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as err:
                error = f"POST {shown} failed: cannot connect ({secrets.scrub(str(err))})"
            except httpx.HTTPError as err:  # a read timeout: it may have arrived; no retry
                error = f"POST {shown} failed: {type(err).__name__} ({secrets.scrub(str(err))})"
                break
            else:
                if response.is_success:
                    status = response.status_code
                    return {"ok": True, "error": None, "status": status, "attempts": attempts}
                snippet = _one_line(secrets.scrub(response.text))[:200]
                error = f"POST {shown} answered {response.status_code}: {snippet}".rstrip(": ")
                if response.status_code < 500:
                    break
            if attempt == 1:
                time.sleep(RETRY_BACKOFF_S)
    return {"ok": False, "error": f"{error} (after {attempts} attempt(s))", "attempts": attempts}


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine: ``localhost``, 127.0.0.0/8 or ``::1``."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def _email(
    channel: ChannelConfig, notice: AlertNotice, timeout: float, secrets: _Secrets
) -> dict[str, Any]:
    assert channel.host is not None and channel.sender is not None
    logs_in = bool(channel.username and channel.password)
    if logs_in and not (channel.ssl or channel.starttls) and not _is_loopback(channel.host):
        # Refused before connecting: the password would cross the network in clear text.
        return {
            "ok": False,
            "error": (
                f"email channel {channel.label!r}: refusing to log in to "
                f"{channel.host}:{channel.port} in clear text; set ssl: true (usually port "
                "465) or starttls: true (usually port 587); only a loopback host "
                "(localhost, 127.0.0.0/8, ::1) may log in without them"
            ),
        }
    username = secrets.expand(channel.username, "username") if channel.username else None
    password = secrets.expand(channel.password, "password") if channel.password else None
    msg = EmailMessage()
    msg["Subject"] = render_subject(notice)
    msg["From"] = channel.sender
    msg["To"] = ", ".join(channel.to)
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=channel.sender.rpartition("@")[2] or "loopline")
    msg.set_content(render_text(notice))
    context = ssl.create_default_context()
    smtp: smtplib.SMTP
    if channel.ssl:
        smtp = smtplib.SMTP_SSL(channel.host, channel.port, timeout=timeout, context=context)
    else:
        smtp = smtplib.SMTP(channel.host, channel.port, timeout=timeout)
    with smtp:
        smtp.ehlo()
        if channel.starttls and not channel.ssl:
            smtp.starttls(context=context)
            smtp.ehlo()
        if username and password:
            smtp.login(username, password)
        refused = smtp.send_message(msg)
    result: dict[str, Any] = {"ok": True, "error": None, "recipients": list(channel.to)}
    if refused:  # some recipients taken, some not
        result["refused"] = sorted(refused)
    return result


def _send(channel: ChannelConfig, notice: AlertNotice, timeout: float) -> dict[str, Any]:
    secrets = _Secrets(channel)
    try:
        if channel.kind == "log":
            line = render_line(notice)
            level = logging.INFO if notice.kind in _GOOD_NEWS else _LOG_LEVEL[notice.severity]
            logger.log(level, "%s", line)
            return {"ok": True, "error": None, "text": line}
        if channel.kind == "webhook":
            return _post(channel, notice.payload(), timeout, secrets)
        if channel.kind == "slack":
            return _post(channel, {"text": render_slack(notice)}, timeout, secrets)
        return _email(channel, notice, timeout, secrets)
    except Exception as err:  # never raise: a channel down must not stop a pass
        text = secrets.scrub(_one_line(str(err)) or type(err).__name__)
        return {"ok": False, "error": f"{channel.kind} channel {channel.label!r}: {text}"}


def severe_enough(severity: str, min_severity: str) -> bool:
    """True when ``severity`` is at least ``min_severity`` (info < warning < critical)."""
    return _SEVERITY_RANK.get(severity, 0) >= _SEVERITY_RANK.get(min_severity, 0)


def notify(
    channels: list[ChannelConfig], notice: AlertNotice, *, timeout: float | None = None
) -> list[dict[str, Any]]:
    """Tell every channel about ``notice``; one result per channel, in order.

    Each result has ``channel`` (its name or kind), ``kind``, ``ok`` and ``error`` (None or
    one line without secrets), and per kind ``text`` (log), ``status``/``attempts`` (HTTP)
    or ``recipients`` (email). A channel whose ``min_severity`` is above the alert's is
    not sent to: ``ok`` True and ``skipped`` True. ``timeout`` overrides each channel's
    ``timeout_s``. Never raises.
    """
    results = []
    for channel in channels:
        head: dict[str, Any] = {"channel": channel.label, "kind": channel.kind}
        if not severe_enough(notice.severity, channel.min_severity):
            results.append({**head, "ok": True, "error": None, "skipped": True})
            continue
        result = _send(channel, notice, timeout if timeout is not None else channel.timeout_s)
        if not result["ok"]:
            logger.warning("alert %s not sent: %s", notice.alert.get("id"), result["error"])
        results.append({**head, **result})
    return results
