"""Edge: a small agent on each device, and the hub it talks to.

The **agent** (``python -m loopline.edge.agent``) follows its environment's deployment
through the hub, swaps models atomically after verifying them, infers locally (an HTTP
endpoint and/or a folder of frames), buffers its prediction log while the hub is away,
and reports heartbeat and telemetry over HTTP and MQTT. It imports ONNX Runtime, numpy,
Pillow, paho-mqtt and the standard library only: no torch, no FastAPI, no SQLAlchemy.

The **hub** (``loopline hub --env ENV``) answers the agents from the metadata store and
the artifact store, and writes what they report (``store.devices``, ``store.predictions``).
"""

from __future__ import annotations
