"""The HTML report: self-contained, its plot an inline SVG with the threshold and markers."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from loopline.demo.figures import figures
from loopline.demo.report import BOTTOM, HEIGHT, TOP, accuracy_svg, marker_times, render_report
from tests.demo.helpers import story

SVG = "{http://www.w3.org/2000/svg}"


def document() -> dict[str, Any]:
    samples, events, onset = story()
    figs = figures(samples, events, onset=onset, window=50, new_version=2)
    return {
        "ok": True,
        "drift_onset_s": onset,
        "threshold": 0.4,
        "alert_at": figs["alert_at"],
        "drift_warning_at": figs["drift_warning_at"],
        "warnings": figs["warnings"],
        "versions_deployed": [1, 2],
        "accuracy": figs["accuracy"],
        "series": figs["series"],
        "monitor_accuracy": [[40.0, 1, 0.3, 50], [80.0, 2, 0.95, 50]],
        "timings": {"total_s": 123.4, "alert_to_v2_serving_all_s": 34.0},
        "requests": {"sent": 1000, "labelled": 1000, "errors": 0},
        "versions": [
            {
                "version": 1,
                "trigger": "manual",
                "dataset_version": "ab" * 32,
                "test": {"accuracy": 0.93, "macro_f1": 0.93, "by_condition": {"day": 0.93}},
                "production": {
                    "answers": 700,
                    "labelled": 700,
                    "accuracy": 0.6,
                    "by_condition": {"day": {"labelled": 300, "accuracy": 1.0}},
                },
            },
            {
                "version": 2,
                "trigger": "alert",
                "dataset_version": "cd" * 32,
                "test": {"accuracy": 0.95, "macro_f1": 0.95, "by_condition": {"day": 0.96}},
                "production": {
                    "answers": 300,
                    "labelled": 300,
                    "accuracy": 1.0,
                    "by_condition": {"fog": {"labelled": 300, "accuracy": 1.0}},
                },
            },
        ],
        "lineage": {
            "chain": [
                {"kind": "alert", "id": 2, "at": "2026-01-01T00:00:36", "text": "accuracy < 0.4"},
                {"kind": "model_version", "id": "vehicles:2", "text": "accuracy 0.950"},
            ],
            "loop": {
                "timeline": [
                    {
                        "at": "t",
                        "step": "build",
                        "status": "succeeded",
                        "detail": "built vehicles:2",
                    }
                ]
            },
        },
        "timeline": [e.to_dict() for e in events]
        + [{"t": 99.0, "kind": "step", "text": "a <b>bold</b> & odd path"}],
    }


def plot(doc: dict[str, Any]) -> ET.Element:
    return ET.fromstring(accuracy_svg(doc))  # also: the SVG is well-formed XML


def test_the_plot_draws_accuracy_threshold_and_every_marker() -> None:
    doc = document()
    svg = plot(doc)
    line = svg.find(f"{SVG}polyline[@class='accuracy']")
    assert line is not None
    points = [tuple(map(float, p.split(","))) for p in line.attrib["points"].split()]
    assert len(points) == min(len(doc["series"]), 801)  # thinned to 800 and the last
    threshold = svg.find(f"{SVG}line[@class='threshold']")
    assert threshold is not None
    plot_h = HEIGHT - TOP - BOTTOM
    y_threshold = float(threshold.attrib["y1"])
    assert y_threshold == pytest.approx(TOP + 0.6 * plot_h, abs=0.1)
    # It starts at 100% (the top), dips under the threshold, and ends back at 100%.
    assert points[0][1] == TOP and points[-1][1] == TOP
    assert max(y for _, y in points) > y_threshold
    marks = {
        m.attrib["class"].split()[1]: float(m.attrib["data-t"])
        for m in svg.iter(f"{SVG}line")
        if m.attrib.get("class", "").startswith("marker ")
    }
    assert marks == {
        "marker-drift": 30.0,
        "marker-warning": 32.5,
        "marker-alert": 36.0,
        "marker-canary": 60.0,
        "marker-redeploy": 70.0,
    }
    # Markers sit where their time is on the x axis: drift before alert before redeploy.
    xs = {
        m.attrib["class"].split()[1]: float(m.attrib["x1"])
        for m in svg.iter(f"{SVG}line")
        if m.attrib.get("class", "").startswith("marker ")
    }
    assert xs["marker-drift"] < xs["marker-alert"] < xs["marker-redeploy"]
    labels = [t.text for t in svg.iter(f"{SVG}text")]
    assert "drift warning" in labels and "alert" in labels and "v2 serves all" in labels
    assert len(list(svg.iter(f"{SVG}circle"))) == 2  # the monitor's two measurements


def test_a_warning_that_is_not_drift_is_labelled_early_warning() -> None:
    doc = document()
    doc["drift_warning_at"] = None
    doc["warnings"] = [{**doc["warnings"][0], "rule": "accuracy-collapse", "metric": "cusum"}]
    labels = [t.text for t in plot(doc).iter(f"{SVG}text")]
    assert "early warning" in labels and "drift warning" not in labels


def test_markers_are_left_out_when_nothing_happened() -> None:
    doc = document()
    for key in ("alert_at", "drift_warning_at"):
        doc[key] = None
    doc["warnings"], doc["timeline"] = [], []
    assert marker_times(doc) == {"drift": 30.0}
    assert plot({"series": [], "timeline": []}).find(f"{SVG}polyline") is None


def test_the_report_is_self_contained_and_escapes_text() -> None:
    html = render_report(document())
    assert html.startswith("<!doctype html>") and "<svg" in html
    assert "<script" not in html.lower()
    urls = re.findall(r"(?:src|href)=|https?://[^\s\"']+", html)
    assert urls == ["http://www.w3.org/2000/svg"]  # the SVG namespace only: nothing fetched
    assert "a &lt;b&gt;bold&lt;/b&gt; &amp; odd path" in html
    for text in (
        "v1",
        "v2",
        "macro F1 0.950",
        "fog 100.0% (300)",
        "vehicles:2",
        "built vehicles:2",
        "34 s from the alert to v2 serving all traffic",
    ):
        assert text in html, text


def test_a_run_that_did_not_finish_says_why() -> None:
    doc = {**document(), "ok": False, "reason": "the retrain loop ended rejected"}
    html = render_report(doc)
    assert "(did not finish)" in html and "the retrain loop ended rejected" in html
