"""`loopline monitor`, `alerts`, `alerts show`, `alerts export-prometheus`, `approve` and
`reject`: thin shells over the monitoring service and the loop, on a real project store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.cli.test_cli import invoke, one_line_error
from tests.monitor.test_service import ACCURACY_RULE, log_predictions, make_store, right, wrong


def _project(tmp_path: Path, action: str = "approve") -> tuple[Path, str]:
    """A project whose imported model m:1 serves production (its retrain loop waits for
    a person at once), with one accuracy rule; returns (config path, store URL)."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = tmp_path / "loopline.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "store": {"metadata_url": url, "artifacts_url": str(tmp_path / "artifacts")},
                "model": {"name": "m"},
                "monitor": {
                    "rules": [{**ACCURACY_RULE, "action": action}],
                    "channels": [{"kind": "log"}],
                    "owner": "qa@example.com",
                },
            }
        )
    )
    make_store(url, imported=True).close()
    return cfg, url


def _fire(cfg: Path, url: str) -> dict:
    from loopline.drivers.metadata.store import MetadataStore

    store = MetadataStore(url)
    log_predictions(store, right(10) + wrong(50))
    store.close()
    code, out, err = invoke("monitor", "--once", "--json", "-c", str(cfg))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1  # one JSON object per pass, one line
    return json.loads(lines[0])


def test_monitor_once_alerts_show_and_approve(tmp_path: Path) -> None:
    cfg, url = _project(tmp_path)
    c = ["-c", str(cfg)]
    report = _fire(cfg, url)
    [change] = report["changes"]
    assert (change["rule"], change["kind"], change["value"]) == ("accuracy-low", "firing", 0.0)
    alert_id = change["alert_id"]
    assert [n["kind"] for n in report["notifications"]] == ["firing", "awaiting-approval"]
    assert [(i["event"], i["status"]) for i in report["loops"]] == [("started", "waiting_approval")]

    code, out, err = invoke("alerts", "--json", *c)
    assert code == 0, err
    [row] = json.loads(out)
    assert (row["id"], row["state"], row["loop"]["status"]) == (
        alert_id,
        "firing",
        "waiting_approval",
    )
    code, out, err = invoke("alerts", *c)
    assert code == 0, err
    assert "accuracy-low" in out and "firing" in out and "waiting_approval" in out
    code, out, err = invoke("alerts", "--state", "resolved", *c)
    assert code == 0 and "no alerts" in out, err

    code, out, err = invoke("alerts", "show", str(alert_id), "--json", *c)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["alert"]["id"] == alert_id and shown["chain"][0]["kind"] == "alert"
    kinds = [e["kind"] for e in shown["events"]]
    assert "firing" in kinds and "notified" in kinds and "loop.waiting_approval" in kinds
    code, out, err = invoke("alerts", "show", str(alert_id), *c)
    assert code == 0, err
    assert f"alert {alert_id}: accuracy-low firing" in out and "chain" in out

    code, out, err = invoke("approve", str(alert_id), *c)
    assert code == 0 and f"alert {alert_id}: approved" in out, err
    # Decided already: nothing waits any more.
    code, _, err = invoke("approve", str(alert_id), *c)
    assert code == 1 and "not waiting for approval" in one_line_error(err)
    code, _, err = invoke("reject", str(alert_id), "--reason", "late", *c)
    assert code == 1 and "has ended (succeeded); nothing to reject" in one_line_error(err)


def test_reject_keeps_the_incumbent_and_says_why(tmp_path: Path) -> None:
    cfg, url = _project(tmp_path)
    c = ["-c", str(cfg)]
    alert_id = _fire(cfg, url)["changes"][0]["alert_id"]
    code, out, err = invoke("reject", str(alert_id), "--reason", "QA saw fog only", "--json", *c)
    assert code == 0, err
    assert json.loads(out)["status"] == "rejected"
    code, out, err = invoke("alerts", "show", str(alert_id), "--json", *c)
    assert code == 0, err
    shown = json.loads(out)
    assert "QA saw fog only" in shown["alert"]["reason"]
    assert shown["loop"]["status"] == "rejected"
    # The next pass tells the channels, once.
    code, out, err = invoke("monitor", "--once", "--json", *c)
    assert code == 0, err
    assert [n["kind"] for n in json.loads(out)["notifications"]] == ["retrain-rejected"]
    code, out, err = invoke("monitor", "--once", "--json", *c)
    assert code == 0 and json.loads(out)["notifications"] == [], err


def test_unknown_alerts_and_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    cfg, _ = _project(tmp_path)
    c = ["-c", str(cfg)]
    for args in (("approve", "999"), ("reject", "999", "--reason", "x"), ("alerts", "show", "999")):
        code, _, err = invoke(*args, *c)
        assert code == 1 and "999" in one_line_error(err), args
    code, _, err = invoke("monitor", "--once", "--interval", "soon", *c)
    assert code == 1 and "interval 'soon'" in one_line_error(err)
    code, _, err = invoke("alerts", "--state", "loud", *c)
    assert code == 1 and "--state 'loud'" in one_line_error(err)


def test_monitor_once_prints_the_changes(tmp_path: Path) -> None:
    from loopline.drivers.metadata.store import MetadataStore

    cfg, url = _project(tmp_path, action="none")
    store = MetadataStore(url)
    log_predictions(store, wrong(50))
    store.close()
    code, out, err = invoke("monitor", "--once", "--interval", "1s", "-c", str(cfg))
    assert code == 0, err
    assert "FIRING" in out and "accuracy-low (critical)" in out and "+50 labels" in out
    assert "told log about" in out


@pytest.mark.parametrize("to_file", [True, False])
def test_export_prometheus(tmp_path: Path, to_file: bool) -> None:
    cfg, _ = _project(tmp_path)
    target = tmp_path / "rules.yml"
    args = ["alerts", "export-prometheus", "-c", str(cfg)]
    code, out, err = invoke(*args, *(["--out", str(target)] if to_file else []))
    assert code == 0, err
    text = target.read_text() if to_file else out
    doc = yaml.safe_load(text)
    names = [r["alert"] for g in doc["groups"] for r in g["rules"]]
    assert any("accuracy" in n.lower() for n in names), names
    if to_file:
        assert f"to {target}" in err


def test_monitor_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    cfg, _ = _project(tmp_path, action="none")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from loopline.cli.main import run; run()",
            "monitor",
            "--interval",
            "200ms",
            "--json",
            "-c",
            str(cfg),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline() if proc.stdout else ""
        assert json.loads(first)["errors"] == []  # it runs passes
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    for line in out.strip().splitlines():  # the pass under way finished whole
        json.loads(line)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("2d", 172_800.0),
        ("1h30m", 5400.0),
        ("1d2h3m4s5ms", 93_784.005),
        ("1.5h", 5400.0),
        (" 10 s ", 10.0),
        ("5", 5.0),
        ("2H", 7200.0),
    ],
)
def test_one_duration_parser_for_interval_and_since(text: str, seconds: float) -> None:
    from loopline.cli import metrics, monitor
    from loopline.cli.durations import parse_duration

    assert metrics.parse_duration is parse_duration  # `predictions --since` uses the same one
    assert monitor.parse_interval(text) == pytest.approx(seconds)
    assert parse_duration(text, "--since") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["soon", "", "0s", "-5s", "5x", "1h30", "h", "5 mins", "1m-2s"])
def test_a_bad_duration_names_the_option_and_the_forms(text: str) -> None:
    from loopline.cli.durations import parse_duration
    from loopline.errors import ConfigError

    for option in ("--interval", "--since"):
        with pytest.raises(ConfigError) as err:
            parse_duration(text, option)
        message = str(err.value)
        assert message.startswith(f"invalid {option} {text!r}: use a positive duration")
        assert "ms, s, m, h or d" in message and "1h30m" in message
