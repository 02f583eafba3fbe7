"""The replica test: a candidate checked through a running server's HTTP API before release.

``run_replica_test`` runs four phases against the server at ``url`` serving the candidate:

- **bulk**: the held-out test split, in multipart batches, scored with the build's own
  metric functions (``loopline.metrics``) and checked against the rules (the gate's by
  default, parsed by the gate's parser);
- **replay**: recorded production requests whose images were captured, sent again
  (skipped, not failed, when there is nothing to replay). Those whose ground truth came
  back (feedback) are judged by accuracy: the candidate's may trail production's by
  ``max_accuracy_drop`` at most. Agreement with production's logged answers is checked
  on the others only, and not when the labelled ones show production clearly less
  accurate than the candidate: the loop retrains because production fails, and a good
  candidate then disagrees with it on purpose. Each check needs ``min_replay_requests``;
  one not made is reported with the reason;
- **load**: ``load_requests`` single-image requests from ``concurrency`` clients: error
  rate and p95 latency under their budgets;
- **memory**: the peak resident memory of the server's processes (children included,
  sampled from ``/proc`` during the test) under its budget.

Every check has a name, a value, a limit and whether it passed; a failed one gives one line
of ``reasons``. ``loopline.deploy.preprod.deploy`` starts the replica and records the report.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from loopline.deploy.replica_inputs import ReplaySample, TestSplit, media_type
from loopline.deploy.replica_procs import MemorySampler
from loopline.deploy.replica_report import (
    Check,
    PhaseReport,
    ReplayTally,
    ReplicaTestReport,
    check,
    fmt,
    judge_replay,
)
from loopline.errors import ConfigError, LooplineError, NotFound

if TYPE_CHECKING:
    from loopline.environments import ReplicaTestPolicy
    from loopline.pipeline.step import Reporter

__all__ = ["Check", "PhaseReport", "ReplicaTestReport", "run_replica_test"]
LOAD_IMAGES = 32  # distinct test images cycled through in the load phase


# -- phases ----------------------------------------------------------------------------------------
def _error_text(r: httpx.Response) -> str:
    try:
        return f"HTTP {r.status_code}: {r.json().get('error', r.text)}"[:300]
    except ValueError:
        return f"HTTP {r.status_code}: {r.text[:200]}"


def _predict_batch(
    client: httpx.Client, path: str, images: list[bytes]
) -> tuple[list[str] | None, str | None]:
    """The labels the server answers for ``images`` (one request), or (None, error)."""
    files = [("image", (f"{i}", data, media_type(data))) for i, data in enumerate(images)]
    try:
        r = client.post(path, files=files)
    except httpx.HTTPError as err:
        return None, f"{type(err).__name__}: {err}"[:300]
    if r.status_code != 200:
        return None, _error_text(r)
    return [p["label"] for p in r.json()["predictions"]], None


def _bulk(
    client: httpx.Client, path: str, split: TestSplit, labels: list[str], rules: list[str],
    segments: Sequence[str], batch_size: int, policy: ReplicaTestPolicy, reporter: Reporter,
) -> PhaseReport:  # fmt: skip
    from loopline.builder.gate import lookup, parse_rule
    from loopline.builder.scoring import segment_reports
    from loopline.metrics import classification_report

    phase = PhaseReport("bulk", details=split.describe())
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(split.records["label"]) - set(index))
    if unknown:
        raise ConfigError(
            f"the test split has labels {', '.join(unknown)} that the served model does not "
            f"know (its labels: {', '.join(labels)})"
        )
    n = len(split)
    pred = np.full(n, -1, dtype=np.int64)
    failed, first_error = 0, None
    bar = reporter.progress("bulk", n, "test images")
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        answers, error = _predict_batch(client, path, [split.read(i) for i in idx])
        if answers is None:
            failed += len(idx)
            first_error = first_error or error
        else:
            pred[idx] = [index.get(label, -1) for label in answers]
        bar.advance(len(idx))
    bar.close()
    y = np.array([index[label] for label in split.records["label"]], dtype=np.int64)
    ok = pred >= 0
    report = classification_report(y[ok], pred[ok], labels)
    answered = split.records[ok].reset_index(drop=True)
    report["segments"] = segment_reports(answered, y[ok], pred[ok], labels, list(segments))
    phase.details.update(
        answered=int(ok.sum()), failed=failed, first_error=first_error, batch_size=batch_size,
        metrics={k: v for k, v in report.items() if k != "segments"},
        segments=report["segments"],
    )  # fmt: skip
    phase.checks.append(
        check(
            "bulk error rate",
            failed / n,
            "<=",
            policy.max_error_rate,
            "replica_test.max_error_rate",
        )  # fmt: skip
    )
    for rule in rules:
        metric, op, threshold = parse_rule(rule)
        try:
            value: float | None = lookup(report, metric) if ok.any() else None
        except ConfigError:  # e.g. a segment the test split has no image of
            value = None
        phase.checks.append(check(metric, value, op, threshold, f"rule {rule.strip()}"))
    return phase


def _replay(
    client: httpx.Client, path: str, sample: ReplaySample, policy: ReplicaTestPolicy,
    batch_size: int, reporter: Reporter,
) -> PhaseReport:  # fmt: skip
    phase = PhaseReport("replay")
    phase.details.update(
        environment=sample.live, recorded=len(sample.items), without_image=sample.without_image,
        note="predictions logged without their image cannot be replayed (only their input "
        "statistics are kept); they are counted here, not sent",
    )  # fmt: skip
    if not sample.items:
        phase.status, phase.reason = "skipped", sample.skip_reason
        return phase
    items, missing = [], 0
    images: list[bytes] = []
    for item in sample.items:
        try:
            images.append(sample.read(item))
            items.append(item)
        except NotFound:  # purged since it was listed
            missing += 1
    tally, failed = ReplayTally(), 0
    first_error = None
    by_model: dict[str, int] = {}
    bar = reporter.progress("replay", len(items), "recorded requests")
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        answers, error = _predict_batch(client, path, images[start : start + batch_size])
        if answers is None:
            failed += len(chunk)
            first_error = first_error or error
        else:
            for item, label in zip(chunk, answers, strict=True):
                tally.add(item, label)
                by_model[item.model] = by_model.get(item.model, 0) + 1
        bar.advance(len(chunk))
    bar.close()
    phase.details.update(
        replayed=len(items), missing_blobs=missing, compared=tally.compared,
        agreed=tally.agreed, failed=failed, first_error=first_error,
        production_versions=by_model,
    )  # fmt: skip
    if not items:
        phase.status = "skipped"
        phase.reason = f"the {missing} captured images listed were purged meanwhile"
        return phase
    phase.checks.append(
        check(
            "replay error rate",
            failed / len(items),
            "<=",
            policy.max_error_rate,
            "replica_test.max_error_rate",
        )  # fmt: skip
    )
    judge_replay(phase, tally, policy)
    return phase


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion, also when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _load_requests(
    url: str, path: str, bodies: list[bytes], n: int, concurrency: int, headers: dict[str, str]
) -> tuple[list[float], int, str | None, float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    todo = iter(range(n))
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=60.0, limits=limits, trust_env=False
    ) as client:

        async def one_client() -> None:
            nonlocal errors, first_error
            for i in todo:  # one shared iterator: the clients take requests in turn
                body = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                error = None
                try:
                    r = await client.post(
                        path, content=body, headers={"content-type": media_type(body)}
                    )
                    if r.status_code != 200:
                        error = _error_text(r)
                except httpx.HTTPError as err:
                    error = f"{type(err).__name__}: {err}"[:300]
                if error is None:
                    latencies.append((time.perf_counter() - t0) * 1000.0)
                else:
                    errors += 1
                    first_error = first_error or error

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, errors, first_error, wall


def _load(
    url: str, path: str, split: TestSplit, policy: ReplicaTestPolicy, headers: dict[str, str],
    reporter: Reporter,
) -> PhaseReport:  # fmt: skip
    phase = PhaseReport("load")
    n, c = policy.load_requests, policy.concurrency
    if n == 0:
        phase.status, phase.reason = "skipped", "no load requests (replica_test.load_requests: 0)"
        return phase
    bodies = [split.read(i) for i in range(min(LOAD_IMAGES, len(split)))]
    reporter.log("load", f"{n} requests from {c} clients")
    latencies, errors, first_error, wall = _run(_load_requests(url, path, bodies, n, c, headers))
    lat = np.array(latencies)
    pct = {q: float(np.percentile(lat, q)) if lat.size else None for q in (50, 95, 99)}
    phase.details.update(
        requests=n, concurrency=c, errors=errors, first_error=first_error,
        seconds=round(wall, 3), requests_per_s=round(n / wall, 1) if wall > 0 else None,
        p50_ms=pct[50], p95_ms=pct[95], p99_ms=pct[99],
    )  # fmt: skip
    phase.checks.append(
        check(
            "load error rate",
            errors / n,
            "<=",
            policy.max_error_rate,
            "replica_test.max_error_rate",
        )  # fmt: skip
    )
    phase.checks.append(
        check(
            "load p95 latency", pct[95], "<=", policy.max_p95_ms, "replica_test.max_p95_ms", "ms"
        )  # fmt: skip
    )
    return phase


def _memory(sampler: MemorySampler | None, policy: ReplicaTestPolicy) -> PhaseReport:
    phase = PhaseReport("memory")
    if sampler is None or sampler.peak_mb is None:
        phase.status = "skipped"
        phase.reason = (
            "the server's processes are not on this machine, so their memory cannot be read"
            if sampler is None
            else sampler.unavailable or "no server process found to measure"
        )
        return phase
    phase.details.update(sampler.describe())
    phase.checks.append(
        check(
            "server memory (peak RSS)",
            sampler.peak_mb,
            "<=",
            policy.max_memory_mb,
            "replica_test.max_memory_mb",
            "MB",
        )  # fmt: skip
    )
    return phase


# -- the test ------------------------------------------------------------------------------------
def model_labels(client: httpx.Client, name: str) -> list[str]:
    """The labels of the served model, from ``GET /v1/models/{name}``."""
    r = client.get(f"/v1/models/{name}")
    if r.status_code != 200:
        raise LooplineError(f"the replica does not describe model {name}: {_error_text(r)}")
    return list(r.json()["labels"])


def run_replica_test(
    url: str,
    name: str,
    version: int,
    *,
    policy: ReplicaTestPolicy,
    rules: list[str],
    test_split: TestSplit,
    replay: ReplaySample | None = None,
    pids: Callable[[], list[int]] | None = None,
    token: str | None = None,
    segments: Sequence[str] = (),
    batch_size: int = 16,
    environment: str = "staging",
    reporter: Reporter | None = None,
) -> ReplicaTestReport:
    """Test ``name:version`` served at ``url``; see the module docstring.

    ``pids`` returns the server's process ids (its children are found by itself); None
    when its processes are not on this machine (the memory phase is then skipped).
    ``token`` is sent as a bearer token (servers that require one on predict).
    """
    from loopline.builder.gate import parse_rule
    from loopline.pipeline.step import SilentReporter

    for rule in rules:
        parse_rule(rule)
    reporter = reporter or SilentReporter()
    headers = {"authorization": f"Bearer {token}"} if token else {}
    report = ReplicaTestReport(name, version, environment, url, datetime.now(UTC))
    report.notes.extend(test_split.notes)
    path = f"/v1/models/{name}/versions/{version}/predict"
    sampler = MemorySampler(pids) if pids is not None else None
    if sampler is not None:
        sampler.start()
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=60.0, trust_env=False) as client:
            labels = model_labels(client, name)
            steps: list[tuple[str, Callable[[], PhaseReport]]] = [
                ("bulk", lambda: _bulk(client, path, test_split, labels, rules, segments,
                                       batch_size, policy, reporter)),
                ("replay", lambda: _replay(client, path, replay or ReplaySample(None, [], 0),
                                           policy, batch_size, reporter)),
                ("load", lambda: _load(url, path, test_split, policy, headers, reporter)),
            ]  # fmt: skip
            for phase_name, run_phase in steps:
                report.phases.append(_timed(phase_name, run_phase, reporter))
    finally:
        if sampler is not None:
            sampler.stop()
    report.phases.append(_timed("memory", lambda: _memory(sampler, policy), reporter))
    report.finished_at = datetime.now(UTC)
    return report


def _timed(name: str, run_phase: Callable[[], PhaseReport], reporter: Reporter) -> PhaseReport:
    reporter.step_started(name)
    t0 = time.perf_counter()
    phase = run_phase().settle()
    phase.seconds = round(time.perf_counter() - t0, 3)
    if phase.status == "failed":
        note = "; ".join(c.reason for c in phase.checks if not c.passed)
    elif phase.status == "skipped":
        note = phase.reason or ""
    else:
        note = ", ".join(f"{c.name} {fmt(c.value)}{' ' + c.unit if c.unit else ''}"
                         for c in phase.checks)  # fmt: skip
    reporter.step_finished(name, phase.status, phase.seconds, note)
    return phase
