"""The benchmark's model: Loopline's own CNN at the production default size.

``VehicleCNN`` as ``loopline build`` trains it by default (64x64 input, depth 3, width 32),
exported by the same ``export_onnx`` as the package step, so every server runs exactly the
model a build would ship. Weights are seeded, untrained: serving cost does not depend on them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loopline.builder.trainer import export_onnx
from loopline.examples.vehicles.cnn import VehicleCNN

LABELS = ["car", "van", "truck", "bus", "motorcycle"]
SIZE = 64


def make_model() -> VehicleCNN:
    torch.manual_seed(0)
    return VehicleCNN(num_classes=len(LABELS), input_size=SIZE).eval()


def export(folder: Path) -> tuple[Path, Path]:
    """Write ``model.onnx`` (one self-contained file) and ``weights.pt``; return both paths."""
    net = make_model()
    onnx_path, weights = folder / "model.onnx", folder / "weights.pt"
    export_onnx(net, SIZE, onnx_path)
    torch.save(net.state_dict(), weights)
    return onnx_path, weights
