"""The hub's MQTT subscriber: device telemetry and status from the broker into the store.

It subscribes (QoS 1) to ``<prefix>/<env>/+/telemetry`` and ``<prefix>/<env>/+/status``
of every environment the hub serves, with a persistent session (a stable client id and
``clean_session`` off), so the broker keeps the messages that arrive while the hub is
restarting. Messages are handed from paho's network thread to a writer thread, which
records them exactly as the HTTP endpoint does, with ``via="mqtt"``. A message that does
not parse, or whose device id differs from its topic's, is logged and dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from loopline.edge import protocol
from loopline.edge.mqtt import MqttLink
from loopline.edge.reports import Report

if TYPE_CHECKING:
    from loopline.edge.hub import Hub

log = logging.getLogger("loopline.edge")

MAX_WAITING = 10_000
_STOP = object()


class Subscriber:
    """MQTT links (one per broker URL) feeding one writer thread."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.queue: queue.Queue[Any] = queue.Queue(MAX_WAITING)
        self.links: list[MqttLink] = []
        by_url: dict[str, list[tuple[str, str]]] = {}
        for env, settings in hub.envs.items():
            if settings.edge.mqtt_url:
                by_url.setdefault(settings.edge.mqtt_url, []).append(
                    (env, settings.edge.topic_prefix)
                )
        if not by_url:
            raise ValueError("no environment of this hub sets edge.mqtt_url")
        for url, envs in by_url.items():
            client_id = "loopline-hub-" + "-".join(sorted(e for e, _ in envs))
            link = MqttLink(url, client_id[:200], clean_session=False)
            for env, prefix in envs:
                for kind in ("telemetry", "status"):
                    topic = f"{prefix}/{env}/+/{kind}"
                    link.subscribe(topic, self._handler(env, prefix))
            self.links.append(link)
        self.written = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="loopline-hub-mqtt", daemon=True)

    def start(self) -> None:
        self._thread.start()
        for link in self.links:
            link.start()

    def stop(self) -> None:
        for link in self.links:
            link.stop()
        self.queue.put(_STOP)
        self._thread.join(30)

    @property
    def connected(self) -> bool:
        return all(link.connected for link in self.links)

    def _handler(self, env: str, prefix: str) -> Any:
        def handle(topic: str, payload: bytes) -> None:
            parsed = protocol.parse_topic(prefix, env, topic)
            if parsed is None:
                return
            try:
                self.queue.put_nowait((env, parsed[0], parsed[1], payload))
            except queue.Full:
                self.dropped += 1
                log.warning("MQTT backlog full (%d messages); dropped one from %s",
                            MAX_WAITING, topic)  # fmt: skip

        return handle

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            env, device, kind, payload = item
            try:
                self._write(env, device, kind, payload)
                self.written += 1
            except (ValidationError, ValueError) as err:
                self.dropped += 1
                log.warning("dropped an MQTT %s message of %s/%s: %s", kind, env, device, err)
            except Exception:
                self.dropped += 1
                log.exception("cannot record an MQTT %s message of %s/%s", kind, env, device)

    def _write(self, env: str, device: str, kind: str, payload: bytes) -> None:
        if kind == "status":
            self.hub.record_status(env, device, payload.decode("utf-8", "replace").strip())
            return
        report = Report.model_validate_json(payload)
        if report.device_id != device:
            raise ValueError(f"device id {report.device_id!r} does not match the topic's")
        self.hub.record_report(env, report, via="mqtt")
