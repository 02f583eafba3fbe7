"""The edge agent: follows its environment's deployment and infers on the device.

Run it as::

    python -m loopline.edge.agent --hub URL --env ENV --device-id ID --token-file F \\
        --work-dir D [--frames DIR] [--port P] [--config agent.json]

Every ``poll_s`` it asks the hub for the environment's deployment; a new version is
downloaded, checked against its sha256 and its manifest, loaded and tested, then swapped in
while the old one keeps answering (``loopline.edge.model``). It infers on ``POST /predict``
(an image; ``GET /health`` shows what runs) and on new files in ``--frames``, appending
each result to ``frames.jsonl``. Its prediction log waits in a bounded on-disk spool while
the hub is away and is uploaded once it is back, each row once. Every ``heartbeat_s`` it
reports heartbeat and telemetry to the hub over HTTP and to the broker over MQTT.

It imports ONNX Runtime, numpy, Pillow, paho-mqtt and the standard library only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from loopline import __version__
from loopline.edge import protocol
from loopline.edge.agent_config import AgentConfig, parse_args
from loopline.edge.client import HubClient, HubError, HubUnreachable
from loopline.edge.model import ModelSlot
from loopline.edge.spool import Spool
from loopline.edge.telemetry import LatencyWindow, ProcessStats, read_sensors
from loopline.errors import ConfigError, LooplineError

log = logging.getLogger("loopline.edge")

MAX_PENDING_SAMPLES = 100
REJECTED_STATUSES = (400, 413, 422)  # the hub will never take these rows: set them aside


class Agent:
    """The agent's state and its loops (threads), stopped together by ``stop``."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        try:
            token = cfg.token_file.read_text().strip()
        except OSError as err:
            raise ConfigError(f"cannot read the token file {cfg.token_file}: {err}") from None
        if not token:
            raise ConfigError(f"the token file {cfg.token_file} is empty")
        cfg.work_dir.mkdir(parents=True, exist_ok=True)
        self.hub = HubClient(cfg.hub_url, cfg.env, token)
        self.slot = ModelSlot(cfg.work_dir)
        self.spool = Spool(cfg.work_dir / "spool", max_rows=cfg.spool_max_rows)
        self.latency = LatencyWindow()
        self.process = ProcessStats()
        self.stopping = threading.Event()
        self.wake_report = threading.Event()
        self.desired: dict[str, Any] = {}
        self.error: str | None = None
        self.updating = False
        self.hub_reachable = False
        self.refused: dict[str, tuple[str, float, float]] = {}  # sha -> (why, retry at, wait)
        self.pending_samples: deque[dict[str, Any]] = deque(maxlen=MAX_PENDING_SAMPLES)
        self.mqtt: Any = None
        self.threads: list[threading.Thread] = []
        self.http: Any = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self.slot.restore() is None and self.cfg.initial_bundle is not None:
            self._install_initial()
        self._start_mqtt()
        if self.cfg.port is not None:
            from loopline.edge.agent_http import serve_http

            self.http = serve_http(self, self.cfg.host, self.cfg.port)
        loops: list[tuple[str, Callable[[], None]]] = [
            ("control", self._control_loop),
            ("report", self._report_loop),
            ("upload", self._upload_loop),
        ]
        if self.cfg.frames_dir is not None:
            loops.append(("frames", self._frames_loop))
        for name, target in loops:
            t = threading.Thread(target=target, name=f"loopline-agent-{name}", daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        """Stop every loop, try a last upload and report, and say ``offline``."""
        self.stopping.set()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        for t in self.threads:
            t.join(30)
        with contextlib.suppress(Exception):
            self.spool.upload(self._send_rows)
        report = self.report(status=protocol.STATUS_OFFLINE)
        with contextlib.suppress(LooplineError):
            self.hub.report(report)
        if self.mqtt is not None:
            topic = protocol.status_topic(self.cfg.topic_prefix, self.cfg.env, self.cfg.device_id)
            self.mqtt.stop(final=(topic, protocol.STATUS_OFFLINE.encode()))

    def _install_initial(self) -> None:
        meta, tar = self.cfg.initial_model, self.cfg.initial_bundle
        assert tar is not None
        copy = self.slot.folder / f".{uuid.uuid4().hex}.initial"
        try:
            copy.write_bytes(tar.read_bytes())  # the shipped tar stays where it is
            self.slot.install(copy, str(meta["sha256"]), name=str(meta["name"]),
                              version=int(meta["version"]), generation=0)  # fmt: skip
        except (LooplineError, OSError, KeyError, ValueError) as err:
            self.error = f"cannot serve the shipped bundle {tar}: {err}"
            log.error("%s", self.error)
        finally:
            copy.unlink(missing_ok=True)  # moved into place when it was installed

    def _start_mqtt(self) -> None:
        if not self.cfg.mqtt_url:
            return
        from loopline.edge.mqtt import MqttLink

        prefix, env, device = self.cfg.topic_prefix, self.cfg.env, self.cfg.device_id
        status = protocol.status_topic(prefix, env, device)
        online = protocol.STATUS_ONLINE.encode()
        try:
            self.mqtt = MqttLink(
                self.cfg.mqtt_url,
                f"loopline-agent-{env}-{device}",
                will=(status, protocol.STATUS_OFFLINE.encode()),
                on_connect=lambda link: _say_online(link, status, online),
            )
        except (ImportError, ValueError) as err:
            log.warning("no MQTT telemetry: %s", err)
            return
        self.mqtt.start()

    # -- following the deployment ----------------------------------------------------------
    def _control_loop(self) -> None:
        wait = 0.0
        while not self.stopping.wait(wait):
            wait = self.cfg.poll_s
            try:
                desired = self.hub.deployment()
            except HubUnreachable as err:
                self.hub_reachable = False
                log.debug("%s", err)
                continue
            except HubError as err:
                self.hub_reachable = True
                self.error = str(err)
                continue
            self.hub_reachable = True
            self.desired = desired
            self.reconcile(desired)

    def reconcile(self, desired: dict[str, Any]) -> None:
        """Run the deployment's version: nothing to do, or download, verify and swap."""
        sha, version = desired.get("bundle_sha256"), desired.get("version")
        name, generation = desired.get("model_name"), int(desired.get("generation") or 0)
        if not sha or version is None or not name:
            return  # nothing deployed: keep what runs
        current = self.slot.current
        if current is not None and current.sha256 == sha:
            self.slot.set_generation(generation)
            self.error = None
            return
        refused = self.refused.get(sha)
        if refused is not None and time.monotonic() < refused[1]:
            return
        self.updating = True
        try:
            tar = self.hub.download_bundle(sha, self.slot.folder / f".{sha}.download")
            self.slot.install(tar, sha, name=name, version=int(version), generation=generation)
            self.refused.pop(sha, None)
            self.error = None
        except HubUnreachable as err:
            self.hub_reachable = False
            log.info("%s", err)
        except LooplineError as err:  # IntegrityError, a model that does not load, a 4xx
            wait = min(300.0, 2 * refused[2]) if refused else self.cfg.poll_s
            self.refused[sha] = (str(err), time.monotonic() + wait, wait)
            running = current.ref if current is not None else "nothing"
            self.error = f"refused {name}:{version}: {err} (still serving {running})"
            log.error("%s", self.error)
        finally:
            self.updating = False
            self.wake_report.set()

    def status(self) -> str:
        current = self.slot.current
        if self.updating:
            return "updating"
        if self.error and (current is None or self.desired.get("bundle_sha256") != current.sha256):
            return "error"
        return "ok" if current is not None else "no-model"

    # -- reporting -------------------------------------------------------------------------
    def sample(self) -> dict[str, Any]:
        current = self.slot.current
        metrics: dict[str, Any] = {**self.latency.sample(), **self.process.sample()}
        metrics["running"] = current.ref if current is not None else None
        metrics["spool_rows"] = self.spool.pending
        metrics["spool_dropped"] = self.spool.dropped
        sensors = read_sensors(self.cfg.sensors_file)
        if sensors:
            metrics["sensors"] = sensors
        return {"at": _now(), "version": current.version if current else None, "metrics": metrics}

    def report(
        self, status: str | None = None, sample: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        current = self.slot.current
        sample = sample or self.sample()
        return {
            "device_id": self.cfg.device_id,
            "status": status or self.status(),
            "model_name": current.name if current else None,
            "version": current.version if current else None,
            "generation": current.generation if current else None,
            "bundle_sha256": current.sha256 if current else None,
            "host": socket.gethostname(),
            "error": self.error,
            "info": self.info(),
            "telemetry": sample["metrics"],
            "samples": [sample],
        }

    def info(self) -> dict[str, Any]:
        import onnxruntime

        endpoint = f"http://{self.cfg.host}:{self.http.server_port}" if self.http else None
        return {
            "agent": __version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "onnxruntime": onnxruntime.__version__,
            "endpoint": endpoint,
            "frames_dir": str(self.cfg.frames_dir) if self.cfg.frames_dir else None,
        }

    def _report_loop(self) -> None:
        while not self.stopping.is_set():
            sample = self.sample()
            report = self.report(sample=sample)
            if self.mqtt is not None:
                topic = protocol.telemetry_topic(self.cfg.topic_prefix, self.cfg.env,
                                                 self.cfg.device_id)  # fmt: skip
                self.mqtt.publish(topic, json.dumps(report).encode(), qos=1)
            self.pending_samples.append(sample)
            try:
                self.hub.report({**report, "samples": list(self.pending_samples)})
                self.pending_samples.clear()
                self.hub_reachable = True
            except HubUnreachable:
                self.hub_reachable = False
            except HubError as err:
                log.warning("the hub refused a report: %s", err)
                self.pending_samples.clear()
            self.wake_report.wait(self.cfg.heartbeat_s)
            self.wake_report.clear()

    # -- the prediction log ----------------------------------------------------------------
    def log_prediction(self, model: Any, result: dict[str, Any], source: str,
                       metadata: dict[str, Any]) -> str:  # fmt: skip
        pid = uuid.uuid4().hex
        self.spool.add([{
            "id": pid, "at": _now(), "model_name": model.name, "model_version": model.version,
            "source": source, "label": result["label"], "confidence": result["confidence"],
            "probabilities": result["probabilities"], "request_metadata": metadata,
            "input_stats": result["input_stats"], "generation": model.generation,
        }])  # fmt: skip
        return pid

    def _send_rows(self, rows: list[dict[str, Any]]) -> bool:
        for i in range(0, len(rows), protocol.MAX_ROWS_PER_UPLOAD):
            chunk = rows[i : i + protocol.MAX_ROWS_PER_UPLOAD]
            try:
                self.hub.upload(self.cfg.device_id, chunk)
            except HubUnreachable:
                self.hub_reachable = False
                return False
            except HubError as err:
                if err.status not in REJECTED_STATUSES:
                    log.warning("prediction upload refused, will retry: %s", err)
                    return False
                log.error("the hub rejects %d prediction rows (%s); set aside in "
                          "predictions-rejected.jsonl", len(chunk), err)  # fmt: skip
                with open(self.cfg.work_dir / "predictions-rejected.jsonl", "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in chunk)
        return True

    def _upload_loop(self) -> None:
        while not self.stopping.wait(self.cfg.upload_interval_s):
            if self.spool.pending:
                self.spool.upload(self._send_rows)

    def infer(self, data: bytes, source: str, metadata: dict[str, Any]) -> dict[str, Any]:
        """Predict one image on the current model, log it, and return the answer."""
        t0 = time.perf_counter()
        try:
            model, result = self.slot.predict(data)
        except LooplineError:
            self.latency.error()
            raise
        seconds = time.perf_counter() - t0
        self.latency.observe(seconds)
        pid = self.log_prediction(model, result, source, metadata)
        return {"id": pid, "label": result["label"], "confidence": result["confidence"],
                "model": model.ref, "model_name": model.name, "version": model.version,
                "latency_ms": round(seconds * 1000.0, 3)}  # fmt: skip

    # -- a folder of frames ----------------------------------------------------------------
    def _frames_loop(self) -> None:
        from loopline.edge.frames import FrameFolder

        assert self.cfg.frames_dir is not None
        folder = FrameFolder(self.cfg.frames_dir, self.cfg.work_dir)
        while not self.stopping.wait(self.cfg.frames_interval_s):
            if self.slot.current is None:
                continue
            try:
                folder.scan(self)
            except OSError as err:
                log.warning("cannot read the frames folder %s: %s", self.cfg.frames_dir, err)


def _say_online(link: Any, topic: str, payload: bytes) -> None:
    link.publish(topic, payload, retain=True)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def main(argv: list[str] | None = None) -> int:
    try:
        agent = Agent(parse_args(argv))
        agent.start()
    except (LooplineError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("agent %s following %s at %s", agent.cfg.device_id, agent.cfg.env, agent.cfg.hub_url)
    while not stop.wait(1.0):
        pass
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
