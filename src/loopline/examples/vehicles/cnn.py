"""The built-in CNN family for the vehicle classifier (``train.architecture: cnn``).

A plain stack of conv blocks, global average pooling and a linear head: small enough to
train in seconds per epoch on a laptop CPU, and made only of operators every ONNX runtime
supports. The model takes raw pixels (float32 0..255, NCHW) and normalises them inside
``forward``, so the exported ONNX file needs no preprocessing beyond decode and resize.
"""

from __future__ import annotations

import torch
from torch import nn

# (x / 255 - 0.5) / 0.25, folded into one multiply-add: x * _SCALE + _SHIFT.
_SCALE = 1.0 / (255.0 * 0.25)
_SHIFT = -0.5 / 0.25
MAX_CHANNELS = 256


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class VehicleCNN(nn.Module):
    """A stride-2 stem, ``depth`` conv blocks, global average pooling, dropout, linear.

    The stem (conv3x3 stride 2 to ``width // 2`` channels) halves the resolution first:
    convolutions at full resolution dominate the cost on a CPU, and a 64x64 vehicle
    silhouette loses little at 32x32. Block ``i`` is conv3x3-BN-ReLU with
    ``min(width * 2**i, 256)`` channels and a 2x2 max-pool. One conv per block, not two:
    measured on 2 CPU cores the second conv tripled the epoch time for the default size.

    Args:
        num_classes: Number of output logits.
        input_size: Side of the square input image; must survive ``depth`` halvings.
        depth: Number of conv blocks.
        width: Channels of the first block.
        dropout: Dropout probability before the linear head.
    """

    def __init__(
        self,
        num_classes: int,
        input_size: int = 64,
        depth: int = 3,
        width: int = 32,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth} width={width}")
        if input_size < 2 ** (depth + 1):
            raise ValueError(f"input_size {input_size} is too small for depth {depth}")
        c_in = max(width // 2, 4)
        layers: list[nn.Module] = _conv_bn_relu(3, c_in, stride=2)
        for i in range(depth):
            c_out = min(width * 2**i, MAX_CHANNELS)
            layers += _conv_bn_relu(c_in, c_out)
            layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, num_classes)
        self.num_classes = num_classes
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] for raw pixels float32 [N, 3, H, W] in 0..255."""
        x = x * _SCALE + _SHIFT
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.head(self.dropout(x))
