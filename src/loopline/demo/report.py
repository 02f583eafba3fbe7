"""The demo's HTML report: one self-contained file, its plot an inline SVG drawn from the data.

No script and no external file: the accuracy plot is SVG written here from the JSON
timeline (``demo.summary``), with the 40% threshold, the drift onset, the first drift
warning, the alert, the canary and the redeploy marked; then the two versions compared,
the lineage the loop recorded, the timings and the whole timeline.
"""

from __future__ import annotations

from html import escape
from typing import Any

WIDTH, HEIGHT = 920, 340
LEFT, RIGHT, TOP, BOTTOM = 56, 20, 64, 40
MARKERS = {  # kind -> (colour, label)
    "drift": ("#d97706", "drift onset"),
    "warning": ("#ca8a04", "drift warning"),
    "alert": ("#dc2626", "alert"),
    "canary": ("#0891b2", "canary"),
    "redeploy": ("#16a34a", "v2 serves all"),
}
VERSION_COLOURS = ("#2563eb", "#16a34a", "#9333ea", "#ea580c")


def marker_times(doc: dict[str, Any]) -> dict[str, float]:
    """When each marked moment happened (demo seconds); the first of each kind."""
    out: dict[str, float] = {}
    events = doc.get("timeline") or []
    if doc.get("drift_onset_s") is not None:
        out["drift"] = float(doc["drift_onset_s"])
    warning = doc.get("drift_warning_at") or next(iter(doc.get("warnings") or []), None)
    if warning is not None:
        out["warning"] = float(warning["t"])
    if doc.get("alert_at"):
        out["alert"] = float(doc["alert_at"]["t"])
    for kind in ("canary", "redeploy"):
        t = next((e["t"] for e in events if e.get("kind") == kind), None)
        if t is not None:
            out[kind] = float(t)
    return out


def accuracy_svg(doc: dict[str, Any]) -> str:
    """The plot: rolling accuracy over time, threshold line, event markers."""
    series = [(float(t), float(a)) for t, a in doc.get("series") or []]
    marks = marker_times(doc)
    monitor = doc.get("monitor_accuracy") or []
    threshold = float(doc.get("threshold") or 0.4)
    times = [t for t, _ in series] + list(marks.values())
    t0, t1 = (min(times), max(times)) if times else (0.0, 1.0)
    if t1 - t0 < 1.0:
        t1 = t0 + 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + (t - t0) / (t1 - t0) * plot_w

    def y(a: float) -> float:
        return TOP + (1.0 - a) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="accuracy over time">',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fafafa"/>',
    ]
    if "drift" in marks:
        xd = x(marks["drift"])
        parts.append(
            f'<rect class="band-drift" x="{xd:.1f}" y="{TOP}" '
            f'width="{LEFT + plot_w - xd:.1f}" height="{plot_h}" fill="#eef2f7"/>'
        )
    for k in range(6):
        a = k / 5
        parts.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(a):.1f}" y2="{y(a):.1f}" '
            f'stroke="#e5e7eb"/><text x="{LEFT - 8}" y="{y(a) + 4:.1f}" '
            f'text-anchor="end" font-size="11">{a:.0%}</text>'
        )
    for t in _ticks(t0, t1):
        parts.append(
            f'<text x="{x(t):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle" '
            f'font-size="11">{t:.0f} s</text>'
        )
    yt = y(threshold)
    parts.append(
        f'<line class="threshold" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{yt:.1f}" '
        f'y2="{yt:.1f}" stroke="#dc2626" stroke-dasharray="6 4"/>'
        f'<rect x="{LEFT + 2}" y="{yt - 16:.1f}" width="118" height="13" fill="#fff" '
        f'opacity="0.85"/><text x="{LEFT + 6}" y="{yt - 5:.1f}" font-size="11" '
        f'fill="#dc2626">alert threshold {threshold:.0%}</text>'
    )
    for row, (kind, t) in enumerate(sorted(marks.items(), key=lambda kv: kv[1])):
        colour, label = MARKERS[kind]
        if kind == "warning" and not doc.get("drift_warning_at"):
            label = "early warning"
        xm, ly = x(t), TOP - 8 - 14 * (row % 3)
        parts.append(
            f'<line class="marker marker-{kind}" data-t="{t:.2f}" x1="{xm:.1f}" '
            f'x2="{xm:.1f}" y1="{ly + 4}" y2="{TOP + plot_h}" stroke="{colour}" '
            f'stroke-width="1.5"/><text x="{xm + 3:.1f}" y="{ly:.1f}" font-size="11" '
            f'fill="{colour}">{escape(label)}</text>'
        )
    for _t, version, a, _n in monitor:
        if not t0 <= float(_t) <= t1:
            continue
        colour = VERSION_COLOURS[(int(version) - 1) % len(VERSION_COLOURS)]
        parts.append(
            f'<circle class="monitor v{int(version)}" cx="{x(float(_t)):.1f}" '
            f'cy="{y(float(a)):.1f}" r="1.8" fill="{colour}" opacity="0.5"/>'
        )
    if series:
        points = " ".join(f"{x(t):.1f},{y(a):.1f}" for t, a in _thin(series, 800))
        parts.append(
            f'<polyline class="accuracy" points="{points}" fill="none" '
            f'stroke="#111827" stroke-width="1.8"/>'
        )
    window = (doc.get("accuracy") or {}).get("window", 50)
    parts.append(
        f'<text x="{LEFT}" y="{HEIGHT - 6}" font-size="11" fill="#6b7280">'
        f"line: accuracy of the last {window} labelled frames as answered; dots: what the "
        "monitor measured (v1 blue, v2 green); shaded: fog and night</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


def render_report(doc: dict[str, Any]) -> str:
    """The whole report as one HTML document."""
    acc = doc.get("accuracy") or {}
    title = "Loopline demo: the closed loop" + ("" if doc.get("ok") else " (did not finish)")
    sections = [
        f"<h1>{escape(title)}</h1>",
        f"<p class='summary'>{escape(headline(doc))}</p>",
        "" if doc.get("ok") else f"<p class='failed'>{escape(str(doc.get('reason') or ''))}</p>",
        "<h2>Accuracy over time</h2>",
        accuracy_svg(doc),
        "<h2>Figures</h2>",
        _table(["figure", "value"], _figure_rows(doc, acc)),
        "<h2>The versions compared</h2>",
        _versions_table(doc.get("versions") or []),
        "<h2>Lineage of the alert</h2>",
        _lineage(doc.get("lineage")),
        "<h2>Timings</h2>",
        _table(["what", "seconds"], [[k, f"{v:g}"] for k, v in (doc.get("timings") or {}).items()]),
        "<h2>Timeline</h2>",
        _table(
            ["t (s)", "kind", "what"],
            [[f"{e['t']:.1f}", e["kind"], e["text"]] for e in doc.get("timeline") or []],
        ),
    ]
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>\n"
    )


def headline(doc: dict[str, Any]) -> str:
    """The story in one sentence of figures."""
    acc, alert, t = doc.get("accuracy") or {}, doc.get("alert_at"), doc.get("timings") or {}
    parts = [
        f"accuracy before the drift {_pct(acc.get('before_drift'))}, lowest "
        f"{_pct(acc.get('lowest'))}, after the recovery {_pct(acc.get('after_recovery'))}"
    ]
    if alert:
        parts.append(
            f"the alert fired {alert['labelled']} labelled predictions "
            f"({alert['seconds']:.1f} s) after the drift onset"
        )
    if t.get("alert_to_v2_serving_all_s") is not None:
        parts.append(
            f"{t['alert_to_v2_serving_all_s']:.0f} s from the alert to v2 serving all traffic"
        )
    if t.get("total_s") is not None:
        parts.append(f"the demo took {t['total_s']:.0f} s end to end")
    return "; ".join(parts) + "."


def _figure_rows(doc: dict[str, Any], acc: dict[str, Any]) -> list[list[str]]:
    rows = [
        [
            "accuracy before the drift",
            f"{_pct(acc.get('before_drift'))} ({acc.get('before_drift_labelled')} labelled)",
        ],
        ["lowest accuracy (window)", _pct(acc.get("lowest"))],
        [
            "accuracy after the recovery",
            f"{_pct(acc.get('after_recovery'))} ({acc.get('after_recovery_labelled')} labelled)",
        ],
        ["recovered (within 10 points)", "yes" if acc.get("recovered") else "no"],
        ["versions deployed", ", ".join(f"v{v}" for v in doc.get("versions_deployed") or [])],
    ]
    for w in [doc.get("alert_at"), *(doc.get("warnings") or [])]:
        if w:
            rows.append(
                [
                    f"{w.get('rule')} after the drift onset",
                    f"{w['seconds']:.1f} s, {w['labelled']} labelled, "
                    f"{w['predictions']} predictions",
                ]
            )
    req = doc.get("requests") or {}
    rows.append(
        [
            "frames sent / labelled / errors",
            f"{req.get('sent')} / {req.get('labelled')} / {req.get('errors')}",
        ]
    )
    return rows


def _versions_table(versions: list[dict[str, Any]]) -> str:
    rows = []
    for v in versions:
        test, prod = v.get("test") or {}, v.get("production") or {}
        by_test = ", ".join(f"{c} {_pct(a)}" for c, a in (test.get("by_condition") or {}).items())
        by_prod = ", ".join(
            f"{c} {_pct(m.get('accuracy'))} ({m.get('labelled')})"
            for c, m in (prod.get("by_condition") or {}).items()
        )
        rows.append(
            [
                f"v{v['version']}",
                str(v.get("trigger")),
                str(v.get("dataset_version") or "")[:12],
                f"{_pct(test.get('accuracy'))}, macro F1 {_num(test.get('macro_f1'))}",
                by_test or "-",
                f"{_pct(prod.get('accuracy'))} of {prod.get('labelled', 0)} labelled",
                by_prod or "-",
            ]
        )
    return _table(
        [
            "version",
            "trigger",
            "dataset",
            "test split",
            "test by condition",
            "production",
            "production by condition",
        ],
        rows,
    )


def _lineage(lineage: dict[str, Any] | None) -> str:
    if not lineage:
        return "<p>No alert fired, so there is no loop to trace.</p>"
    chain = lineage.get("chain") or []
    items = "".join(
        f"<li><b>{escape(str(c.get('kind')))}</b> <code>{escape(str(c.get('id')))}</code> "
        f"{escape(str(c.get('at') or ''))}: {escape(str(c.get('text') or ''))}</li>"
        for c in chain
    )
    loop = lineage.get("loop") or {}
    steps = _table(
        ["at", "step", "status", "detail"],
        [
            [str(e.get("at", "")), str(e.get("step")), str(e.get("status")), str(e.get("detail"))]
            for e in loop.get("timeline") or []
        ],
    )
    return f"<ol class='chain'>{items}</ol><h3>The loop's steps</h3>{steps}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _ticks(t0: float, t1: float) -> list[float]:
    span = t1 - t0
    step = next((s for s in (5, 10, 15, 30, 60, 120, 300) if span / s <= 10), 600)
    first = (int(t0 // step) + 1) * step
    return [float(t) for t in range(int(first), int(t1) + 1, step)]


def _thin(points: list[tuple[float, float]], most: int) -> list[tuple[float, float]]:
    if len(points) <= most:
        return points
    every = len(points) / most
    return [points[int(i * every)] for i in range(most)] + [points[-1]]


def _pct(value: Any) -> str:
    return f"{float(value):.1%}" if isinstance(value, int | float) else "n/a"


def _num(value: Any) -> str:
    return f"{float(value):.3f}" if isinstance(value, int | float) else "n/a"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:980px;color:#111827}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.9rem}
th,td{border:1px solid #e5e7eb;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f3f4f6}.summary{font-size:1.05rem}.failed{color:#dc2626}
code{font-size:.85rem}ol.chain li{margin:.2rem 0}
"""
