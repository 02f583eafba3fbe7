"""The benchmark's model: a small CNN at the production default size (64x64, 3 convs of 32).

Normalisation is inside ``forward``, as in Loopline bundles, so every server feeds the same
raw 0..255 pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

LABELS = ["car", "van", "truck", "bus", "motorcycle"]


class TinyCNN(nn.Module):
    def __init__(self, width: int = 32, depth: int = 3, n_classes: int = len(LABELS)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x / 255.0 - 0.5) / 0.25
        return self.head(self.features(x).mean(dim=(2, 3)))


def export(folder: Path, size: int = 64) -> tuple[Path, Path]:
    """Write ``model.onnx`` (one self-contained file) and ``weights.pt``; return both paths."""
    torch.manual_seed(0)
    net = TinyCNN().eval()
    onnx_path, weights = folder / "model.onnx", folder / "weights.pt"
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, size, size),),
        str(onnx_path),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
    )
    torch.save(net.state_dict(), weights)
    return onnx_path, weights
