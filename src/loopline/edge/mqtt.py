"""A small wrapper over paho-mqtt shared by the agent and the hub.

It connects in the background (a broker that is down is retried with backoff and never
stops the caller), tracks whether it is connected, and re-subscribes after a reconnect.
paho-mqtt is imported only when a link is made; without it the caller is told which extra
to install.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from loopline.edge.protocol import MqttUrl

log = logging.getLogger("loopline.edge")

Handler = Callable[[str, bytes], None]


def _paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise ImportError(
            "paho-mqtt is not installed; install it (pip install 'loopline[edge]', or "
            "requirements-edge.txt on a device)"
        ) from None
    return mqtt


class MqttLink:
    """One MQTT connection: publish, subscribe, a last will, reconnects on its own."""

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        clean_session: bool = True,
        will: tuple[str, bytes] | None = None,
        on_connect: Callable[[MqttLink], None] | None = None,
        max_queued: int = 1000,
    ) -> None:
        mqtt = _paho()
        self.url = MqttUrl.parse(url)
        self._mqtt = mqtt
        self._subscriptions: dict[str, tuple[int, Handler]] = {}
        self._on_connect_hook = on_connect
        self._connected = threading.Event()
        self.last_error: str | None = None
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        if self.url.username:
            client.username_pw_set(self.url.username, self.url.password)
        if self.url.tls:
            client.tls_set()
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(max_queued)
        client.on_connect = self._connected_cb
        client.on_disconnect = self._disconnected_cb
        client.on_message = self._message_cb
        self.client = client

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background (retried until it succeeds)."""
        self.client.connect_async(self.url.host, self.url.port, keepalive=30)
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, final: tuple[str, bytes] | None = None) -> None:
        """Publish ``final`` (retained; e.g. an ``offline`` status) if connected, disconnect."""
        if final is not None and self.connected:
            info = self.client.publish(final[0], final[1], qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2.0)
        self.client.disconnect()
        self.client.loop_stop()

    # -- messages --------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        """Queue a message; False when paho refused it (its queue is full)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return bool(info.rc in (self._mqtt.MQTT_ERR_SUCCESS, self._mqtt.MQTT_ERR_NO_CONN))

    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None:
        """Call ``handler(topic, payload)`` for each message on ``topic`` (from paho's thread)."""
        self._subscriptions[topic] = (qos, handler)
        if self.connected:
            self.client.subscribe(topic, qos)

    # -- paho callbacks (its network thread) -----------------------------------------------
    def _connected_cb(self, client: Any, _userdata: Any, _flags: Any, reason: Any, _p: Any) -> None:
        if getattr(reason, "is_failure", False):
            self.last_error = f"connection refused: {reason}"
            log.warning("MQTT %s refused the connection: %s", self.url, reason)
            return
        self.last_error = None
        for topic, (qos, _) in self._subscriptions.items():
            client.subscribe(topic, qos)
        self._connected.set()
        log.info("MQTT connected to %s", self.url)
        if self._on_connect_hook is not None:
            try:
                self._on_connect_hook(self)
            except Exception:
                log.exception("MQTT on-connect hook failed")

    def _disconnected_cb(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        if self._connected.is_set():
            log.warning("MQTT disconnected from %s (%s); reconnecting", self.url, reason)
        self._connected.clear()

    def _message_cb(self, _client: Any, _userdata: Any, msg: Any) -> None:
        for pattern, (_, handler) in self._subscriptions.items():
            if self._mqtt.topic_matches_sub(pattern, msg.topic):
                try:
                    handler(msg.topic, bytes(msg.payload))
                except Exception:
                    log.exception("MQTT handler for %s failed", msg.topic)
