"""A monitoring pass on PostgreSQL costs what arrived since the last one, not the log's size.

For each log size (``--small``, default 10k, then ``--rows``, default 1M logged predictions,
30% of them labelled) a database of its own is created, filled by COPY, and dropped. A
first pass (untimed) reads the newest rows into the windows, as a monitor starting up
does; then, ``--rounds`` times, 1,000 new predictions and 300 labels arrive through the
store's own write paths and one incremental pass is timed: ``stream.read_new`` +
``Windows.add`` + ``performance.measure`` of the default accuracy rule. The rounds
alternate between the two sizes, so both see the same machine load. Prints the median
pass at each size (wall, and this process's CPU) and the ratio (large / small; ~1 when
the cost follows the new rows), and EXPLAIN ANALYZE of the pass's queries at the large
size: index range scans (feedback on ix_feedback_updated_at; predictions on
ix_predictions_at or ix_predictions_env_at, whichever the planner prefers), never a
sequential scan.

    python benchmarks/monitor_bench.py                  # 10k and 1M (~2 min)
    python benchmarks/monitor_bench.py --rows 100000    # a quicker look
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import random
import re
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url

from loopline.drivers.metadata.store import MetadataStore
from loopline.monitor import performance
from loopline.monitor.config import MonitorConfig, default_rules
from loopline.monitor.stream import read_new
from loopline.monitor.windows import Windows, sizes_for

PG_ADMIN_URL = os.environ.get(
    "LOOPLINE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
LABELS = ["car", "van", "truck", "bus", "motorcycle"]
CAMERAS = 8
ENV, MODEL = "production", "vehicles"
NEW_PREDICTIONS, NEW_LABELS = 1000, 300
_CHUNK = 50_000
_FEEDBACK_COLS = "prediction_id, label, at, updated_at"
_PRED_COLS = ("id, at, model_name, model_version, source, label, confidence, probabilities, "
              "request_metadata, input_stats, environment, deployment_generation, variant, "
              "camera_id")  # fmt: skip


def bulk_load(store: MetadataStore, n: int, end: datetime) -> float:
    """COPY ``n`` predictions spread over the 30 days before ``end`` (30% labelled, 85%
    right; a tenth in staging), with the secondary indexes built after the load. Returns seconds."""
    t0 = time.perf_counter()
    step = timedelta(days=30) / max(n, 1)
    start = end - timedelta(days=30)
    rng = random.Random(7)
    raw = store.engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN "
            "('predictions', 'feedback') AND indexname LIKE 'ix_%'"
        )
        indexes = cur.fetchall()
        for name, _ in indexes:
            cur.execute(f'DROP INDEX "{name}"')
        for lo in range(0, n, _CHUNK):
            preds, labels = io.StringIO(), io.StringIO()
            for i in range(lo, min(n, lo + _CHUNK)):
                at = start + step * i
                k = rng.randrange(len(LABELS))
                conf = 0.5 + rng.random() / 2
                rest = (1 - conf) / 4
                probs = json.dumps([round(conf if j == k else rest, 6) for j in range(5)])
                cam = f"cam-{i % CAMERAS}"
                meta = json.dumps({"camera_id": cam, "site": "north"})
                stats = json.dumps({"brightness": round(rng.gauss(110, 15), 3),
                                    "contrast": round(rng.gauss(40, 5), 3),
                                    "sharpness": round(rng.gauss(300, 40), 3),
                                    "saturation": round(rng.random(), 3),
                                    "dark_share": round(rng.random() / 5, 3)})  # fmt: skip
                pid = f"b{i:031d}"
                env = "staging" if i % 10 == 9 else ENV  # replica tests log there too
                preds.write(f"{pid}\t{at.isoformat()}\t{MODEL}\t1\tv1\t{LABELS[k]}\t{conf:.6f}\t"
                            f"{probs}\t{meta}\t{stats}\t{env}\t1\tstable\t{cam}\n")  # fmt: skip
                if i % 10 < 3:
                    truth = LABELS[k] if rng.random() < 0.85 else LABELS[(k + 1) % 5]
                    when = (at + timedelta(seconds=60)).isoformat()
                    labels.write(f"{pid}\t{truth}\t{when}\t{when}\n")
            with cur.copy(f"COPY predictions ({_PRED_COLS}) FROM STDIN") as copy:
                copy.write(preds.getvalue())
            with cur.copy(
                "COPY feedback (prediction_id, label, at, updated_at) FROM STDIN"
            ) as copy:
                copy.write(labels.getvalue())
        for _, ddl in indexes:
            cur.execute(ddl)
        cur.execute("ANALYZE predictions")
        cur.execute("ANALYZE feedback")
        raw.commit()
    finally:
        raw.close()
    return time.perf_counter() - t0


def arrive(store: MetadataStore, round_no: int, now: datetime) -> None:
    """1,000 predictions and 300 labels through the server's and the feedback API's paths."""
    rng = random.Random(round_no)
    rows: list[dict[str, Any]] = []
    for i in range(NEW_PREDICTIONS):
        k = rng.randrange(len(LABELS))
        cam = f"cam-{i % CAMERAS}"
        rows.append({
            "id": f"n{round_no:03d}{i:028d}", "at": now + timedelta(microseconds=i),
            "model_name": MODEL, "model_version": 1, "source": "v1", "label": LABELS[k],
            "confidence": 0.8, "probabilities": [0.8 if j == k else 0.05 for j in range(5)],
            "request_metadata": {"camera_id": cam, "site": "north"},
            "input_stats": {"brightness": 110.0, "contrast": 40.0}, "environment": ENV,
            "deployment_generation": 1, "variant": "stable", "camera_id": cam,
        })  # fmt: skip
    store.predictions.log(rows)
    picked = rng.sample(rows, NEW_LABELS)
    store.predictions.record_feedback(
        [(r["id"], r["label"] if rng.random() < 0.85 else "van") for r in picked]
    )


class Captured:
    """The SQL a pass runs, with its parameters, to EXPLAIN afterwards."""

    def __init__(self, store: MetadataStore) -> None:
        self.statements: list[tuple[str, Any]] = []
        self._engine = store.engine
        event.listen(self._engine, "before_cursor_execute", self._hook)

    def _hook(self, conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            self.statements.append((statement, params))

    def stop(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._hook)


class Log:
    """One log size in a database of its own: loaded, then passed over round by round."""

    def __init__(self, admin: Any, n: int) -> None:
        self.n, self._admin = n, admin
        self.db = f"loopline_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.db}"'))
        url = make_url(PG_ADMIN_URL).set(database=self.db).render_as_string(hide_password=False)
        self.store = MetadataStore(url)
        self.config = MonitorConfig()
        self.rule = next(r for r in default_rules() if r.metric == "accuracy")
        self.windows = Windows(*sizes_for(self.config))
        self.passes: list[float] = []
        self.cpu: list[float] = []
        self.state_s: list[float] = []
        self.read: tuple[int, int] = (0, 0)
        self.plans: list[str] = []

    def load(self) -> None:
        self.load_s = bulk_load(self.store, self.n, datetime.now(UTC) - timedelta(hours=1))
        t0 = time.perf_counter()
        first = read_new(self.store, ENV, MODEL, None, self.config.segments, self.config.late_s)
        self.windows.add(first)
        self.first_s = time.perf_counter() - t0
        self.cursor = json.loads(json.dumps(first.cursor))

    def one_pass(self, round_no: int, explain: bool) -> None:
        """New rows arrive; one incremental pass is timed (wall and this process's CPU)."""
        arrive(self.store, round_no, datetime.now(UTC))
        capture = Captured(self.store) if explain else None
        cfg = self.config
        gc.collect()  # earlier garbage is not this pass's cost
        t0, c0 = time.perf_counter(), time.process_time()
        new = read_new(self.store, ENV, MODEL, self.cursor, cfg.segments, cfg.late_s)
        self.windows.add(new)
        at = datetime.now(UTC)
        measured = [
            performance.measure(self.rule, self.windows.view(ENV, MODEL, v, at, self.store, None),
                                {}, cfg)
            for v in self.windows.versions()
        ]  # fmt: skip
        self.passes.append(time.perf_counter() - t0)
        self.cpu.append(time.process_time() - c0)
        if capture is not None:
            capture.stop()
            self.plans = explain_all(self.store, capture.statements)
        t0 = time.perf_counter()
        self.cursor = json.loads(json.dumps(new.cursor))
        json.dumps(self.windows.to_state())
        self.state_s.append(time.perf_counter() - t0)
        self.read = (len(new.logged), len(new.outcomes))
        assert measured and measured[0][0].value is not None

    def result(self) -> dict[str, Any]:
        return {"rows": self.n, "load_s": self.load_s, "first_pass_s": self.first_s,
                "pass_s": statistics.median(self.passes), "cpu_s": statistics.median(self.cpu),
                "passes_s": self.passes, "state_s": statistics.median(self.state_s),
                "read": self.read, "plans": self.plans}  # fmt: skip

    def drop(self) -> None:
        self.store.close()
        with self._admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)'))


def explain_all(store: MetadataStore, statements: list[tuple[str, Any]]) -> list[str]:
    out = []
    raw = store.engine.raw_connection()
    try:
        cur = raw.cursor()
        for sql, params in statements:
            cur.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, params)
            plan = "\n".join(_clip(row[0]) for row in cur.fetchall())
            out.append(" ".join(sql.split())[:160] + " ...\n" + plan)
        raw.rollback()
    finally:
        raw.close()
    return out


def _clip(line: str, width: int = 200) -> str:
    return line if len(line) <= width else line[: width - 4] + " ..."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="the large log")
    parser.add_argument("--small", type=int, default=10_000, help="the small log")
    parser.add_argument("--rounds", type=int, default=7, help="timed passes per size")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    logs: list[Log] = []
    try:
        for n in (args.small, args.rows):
            logs.append(Log(admin, n))
            logs[-1].load()
        for r in range(args.rounds):  # interleaved, so both sizes see the same machine load
            for log in logs:
                log.one_pass(r, explain=log is logs[-1] and r == args.rounds - 1)
        small, large = (log.result() for log in logs)
    finally:
        for log in logs:
            log.drop()
        admin.dispose()
    ratio = large["pass_s"] / small["pass_s"]
    cpu_ratio = large["cpu_s"] / small["cpu_s"]
    if args.json:
        print(json.dumps({"small": small, "large": large, "ratio": ratio,
                          "cpu_ratio": cpu_ratio}, indent=2))  # fmt: skip
        return
    for res in (small, large):
        print(f"{res['rows']:>9,} logged: load {res['load_s']:6.1f} s, first pass "
              f"{res['first_pass_s'] * 1000:5.0f} ms; incremental pass (+{NEW_PREDICTIONS} "
              f"predictions, +{NEW_LABELS} labels) median {res['pass_s'] * 1000:5.1f} ms wall, "
              f"{res['cpu_s'] * 1000:5.1f} ms CPU over {len(res['passes_s'])}, read "
              f"(logged, labelled) {res['read']}; "
              f"state to JSON {res['state_s'] * 1000:4.0f} ms")  # fmt: skip
    print(
        f"ratio {large['rows']:,} / {small['rows']:,}: {ratio:.2f} wall, {cpu_ratio:.2f} CPU "
        "(1.0: the cost follows the new rows, not the log)"
    )
    print("\nEXPLAIN ANALYZE of the incremental pass's queries at", f"{large['rows']:,} rows:")
    for plan in large["plans"]:
        print("\n" + plan)
    used = sorted({m for p in large["plans"] for m in re.findall(r"Index Scan using (\w+)", p)})
    seq = sum("Seq Scan" in p for p in large["plans"])
    print(f"\nindexes used: {', '.join(used)}; sequential scans: {seq}")


if __name__ == "__main__":
    main()
