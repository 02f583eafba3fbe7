"""Simulated CCTV traffic through the production HTTP API, and ground truth after a delay.

``Traffic`` runs one thread per camera: each renders a frame on the fly
(``datagen.render_image``: the lake's own cameras, in the condition the ``Schedule`` says)
and posts it to ``POST /v1/models/NAME/predict?camera_id=...`` over a keep-alive
connection, at a bounded rate (a camera that falls behind skips frames rather than burst,
so 2 cores keep up while a model trains beside it). A labeller thread posts each frame's
true label to ``POST /v1/feedback`` ``label_delay_s`` after its answer, as a person
checking the footage would. Everything sent and answered lands in a ``TrafficLog``, which
the story and the report read.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from loopline.demo.scenario import Schedule

Clock = Callable[[], float]  # seconds since the demo began


@dataclass
class Sample:
    """One frame sent, and what production answered. Times are demo seconds: ``t`` when
    the frame was taken (its condition is the schedule's at ``t``), ``labelled_t`` when
    its ground truth was posted."""

    prediction_id: str
    t: float
    camera: str
    condition: str
    truth: str
    predicted: str
    confidence: float
    version: int
    latency_ms: float
    labelled_t: float | None = None

    @property
    def correct(self) -> bool:
        return self.predicted == self.truth


@dataclass
class TrafficStats:
    """A snapshot for the live display."""

    requests: int
    labelled: int
    errors: int
    skipped: int
    accuracy: float | None  # over the last ``window`` labelled frames
    condition: str
    versions: dict[int, int]  # answers per version among the last 100
    last_error: str | None = None


@dataclass
class TrafficLog:
    """Every frame sent, with its answer and label time; safe across threads."""

    window: int = 50
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    skipped: int = 0
    last_error: str | None = None
    phase: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _labelled: list[Sample] = field(default_factory=list, repr=False)

    def add(self, sample: Sample) -> None:
        with self._lock:
            self.samples.append(sample)

    def labelled(self, sample: Sample, t: float) -> None:
        with self._lock:
            if sample.labelled_t is None:
                sample.labelled_t = t
                self._labelled.append(sample)

    def error(self, message: str) -> None:
        with self._lock:
            self.errors += 1
            self.last_error = message

    def skip(self, n: int) -> None:
        with self._lock:
            self.skipped += n

    def copy(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)

    def labelled_count(self, since_t: float | None = None, until_t: float | None = None) -> int:
        """Frames sent after ``since_t`` whose label had been posted by ``until_t``."""
        with self._lock:
            return sum(
                1
                for s in self._labelled
                if (since_t is None or s.t >= since_t)
                and (until_t is None or (s.labelled_t is not None and s.labelled_t <= until_t))
            )

    def stats(self) -> TrafficStats:
        with self._lock:
            recent = self._labelled[-self.window :]
            answered = self.samples[-100:]
            versions: dict[int, int] = {}
            for s in answered:
                versions[s.version] = versions.get(s.version, 0) + 1
            return TrafficStats(
                requests=len(self.samples),
                labelled=len(self._labelled),
                errors=self.errors,
                skipped=self.skipped,
                accuracy=(sum(s.correct for s in recent) / len(recent)) if recent else None,
                condition=self.phase,
                versions=dict(sorted(versions.items())),
                last_error=self.last_error,
            )


class Traffic:
    """Camera threads posting frames to ``endpoint`` and a labeller posting ground truth.

    ``start`` begins the traffic (its schedule's 0 s is then); ``stop`` ends it after the
    frames in flight and waits for the labeller to post the labels already due.
    """

    def __init__(
        self,
        endpoint: str,
        model_name: str,
        token: str,
        schedule: Schedule,
        clock: Clock,
        *,
        seed: int = 0,
        cameras: int = 4,
        rate: float = 20.0,
        label_delay_s: float = 2.0,
        image_size: tuple[int, int] = (96, 72),
        window: int = 50,
    ) -> None:
        self.endpoint, self.model_name, self.token = endpoint.rstrip("/"), model_name, token
        self.schedule, self.clock, self.seed = schedule, clock, seed
        self.cameras, self.rate, self.label_delay_s = cameras, rate, label_delay_s
        self.image_size = image_size
        self.log = TrafficLog(window=window)
        self.started_t: float | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._due: list[tuple[float, int, Sample]] = []
        self._due_lock = threading.Lock()
        self._seq = 0
        self._labeller_stop = threading.Event()
        self._labeller_thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------------
    def start(self) -> None:
        self.started_t = self.clock()
        self.log.phase = ", ".join(sorted(self.schedule.phase_at(0.0).conditions))
        for k in range(self.cameras):
            thread = threading.Thread(
                target=self._camera, args=(k,), daemon=True, name=f"demo-camera-{k + 1}"
            )
            thread.start()
            self._threads.append(thread)
        labeller = threading.Thread(target=self._labeller, daemon=True, name="demo-labeller")
        labeller.start()
        self._labeller_thread = labeller

    def stop(self, drain_s: float | None = None) -> None:
        """Stop the cameras; let the labeller post what falls due within ``drain_s``."""
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        wait = self.label_delay_s + 1.0 if drain_s is None else drain_s
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self._due_lock:
                if not self._due:
                    break
            time.sleep(0.05)
        self._labeller_stop.set()
        if self._labeller_thread is not None:
            self._labeller_thread.join(30)

    def traffic_seconds(self) -> float:
        """Seconds since the traffic started (the schedule's time)."""
        return 0.0 if self.started_t is None else self.clock() - self.started_t

    @property
    def onset_t(self) -> float | None:
        """The drift onset in demo seconds (None before ``start`` or without a drift)."""
        onset = self.schedule.onset_s
        return None if onset is None or self.started_t is None else self.started_t + onset

    # -- cameras ---------------------------------------------------------------------------
    def _camera(self, k: int) -> None:
        from loopline.examples.vehicles.datagen import CLASSES, camera_id, render_image

        rng = np.random.default_rng([self.seed, 0xCA11, k])
        cam = camera_id(k)
        url = f"{self.endpoint}/v1/models/{self.model_name}/predict"
        period = self.cameras / self.rate
        # Cameras start spread over one period, so requests do not arrive in bursts.
        next_at = time.monotonic() + period * k / self.cameras
        index = 0
        with httpx.Client(timeout=30.0, trust_env=False) as client:
            while not self._stop.is_set():
                now = time.monotonic()
                if next_at > now:
                    if self._stop.wait(next_at - now):
                        break
                elif now - next_at > 1.0:  # fell behind: skip, never burst to catch up
                    missed = int((now - next_at) / period)
                    self.log.skip(missed)
                    next_at += missed * period
                next_at += period
                taken = self.clock()  # the frame's time: its condition is the schedule's then
                phase = self.schedule.phase_at(taken - self._started())
                self.log.phase = ", ".join(sorted(phase.conditions))
                condition = self.schedule.condition_at(taken - self._started(), rng)
                label = CLASSES[int(rng.integers(len(CLASSES)))]
                image = render_image(self.seed, index, k, condition, label, self.image_size)
                index += 1
                self._send(client, url, cam, taken, condition, label, image)

    def _started(self) -> float:
        assert self.started_t is not None
        return self.started_t

    def _send(
        self,
        client: httpx.Client,
        url: str,
        cam: str,
        taken: float,
        condition: str,
        label: str,
        image: bytes,
    ) -> None:
        sent = self.clock()
        try:
            r = client.post(
                url, params={"camera_id": cam}, content=image, headers={"Content-Type": "image/png"}
            )
        except httpx.HTTPError as err:
            self.log.error(f"{cam}: {type(err).__name__}: {err}")
            self._stop.wait(0.5)
            return
        if r.status_code != 200:
            self.log.error(f"{cam}: HTTP {r.status_code}: {r.text[:200]}")
            self._stop.wait(0.5 if r.status_code >= 500 else 0.0)
            return
        answer: dict[str, Any] = r.json()["predictions"][0]
        done = self.clock()
        sample = Sample(
            prediction_id=str(answer["prediction_id"]),
            t=taken,
            camera=cam,
            condition=condition,
            truth=label,
            predicted=str(answer["label"]),
            confidence=float(answer["confidence"]),
            version=int(answer.get("model_version") or r.json().get("model_version") or 0),
            latency_ms=(done - sent) * 1000.0,
        )
        self.log.add(sample)
        with self._due_lock:
            self._seq += 1
            heapq.heappush(self._due, (done + self.label_delay_s, self._seq, sample))

    # -- ground truth ----------------------------------------------------------------------
    def _labeller(self) -> None:
        url = f"{self.endpoint}/v1/feedback"
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(timeout=30.0, trust_env=False, headers=headers) as client:
            while not self._labeller_stop.is_set():
                now = self.clock()
                batch: list[Sample] = []
                with self._due_lock:
                    while self._due and self._due[0][0] <= now and len(batch) < 500:
                        batch.append(heapq.heappop(self._due)[2])
                if batch:
                    self._post_labels(client, url, batch)
                else:
                    self._labeller_stop.wait(0.1)

    def _post_labels(self, client: httpx.Client, url: str, batch: list[Sample]) -> None:
        body = [{"prediction_id": s.prediction_id, "label": s.truth} for s in batch]
        results: list[dict[str, Any]] | None = None
        try:
            r = client.post(url, json=body)
            if r.status_code == 200:
                results = r.json().get("results", [])
            else:
                self.log.error(f"feedback: HTTP {r.status_code}: {r.text[:200]}")
        except (httpx.HTTPError, ValueError) as err:
            self.log.error(f"feedback: {type(err).__name__}: {err}")
        if results is None:
            retry = self.clock() + 0.5
            with self._due_lock:  # try again shortly: labels are never dropped
                for s in batch:
                    self._seq += 1
                    heapq.heappush(self._due, (retry, self._seq, s))
            self._labeller_stop.wait(0.2)
            return
        now = self.clock()
        status = {str(item.get("prediction_id")): item.get("status") for item in results}
        for s in batch:
            if status.get(s.prediction_id) in ("recorded", "updated", "unchanged"):
                self.log.labelled(s, now)
            else:
                self.log.error(f"feedback for {s.prediction_id}: {status.get(s.prediction_id)}")
