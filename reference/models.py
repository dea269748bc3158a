"""A small ResNet for 28x28 grayscale images (Fashion-MNIST), sized for a 2-core CPU.

Architecture (``widths=(w1, w2, w3)``, ``blocks`` residual blocks per stage)::

    conv3x3(in -> w1) + BN + ReLU                       28x28
    stage 1: blocks x BasicBlock(w1 -> w1)              28x28
    stage 2: blocks x BasicBlock(w1 -> w2, stride 2)    14x14
    stage 3: blocks x BasicBlock(w2 -> w3, stride 2)     7x7
    global average pool, linear(w3 -> classes)

A BasicBlock is conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity, or a strided 1x1 conv + BN
when the shape changes), then ReLU (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016). Convolutions have no bias (BatchNorm follows), so every prunable weight is in a
``Conv2d`` or the final ``Linear``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "SmallResNet"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual shortcut.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the first convolution (2 halves the resolution).

    Shapes:
        input ``(N, in_channels, H, W)``, output ``(N, out_channels, ceil(H/stride), ...)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A three-stage ResNet for small grayscale images.

    The default (widths 32/64/128, one block per stage) has about 0.29M parameters and runs
    about 22M multiply-adds per 28x28 image forward.

    Args:
        in_channels: image channels (1 for grayscale).
        num_classes: outputs of the final linear layer.
        widths: channels of the three stages, each >= 1.
        blocks: residual blocks per stage, >= 1.

    Shapes:
        input ``(N, in_channels, H, W)`` (any ``H, W >= 4``), output ``(N, num_classes)`` logits.

    Raises:
        ValueError: if ``widths`` does not have three positive entries or ``blocks < 1``.

    Example:
        >>> model = SmallResNet(widths=(8, 16, 32))
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (32, 64, 128),
        blocks: int = 1,
    ) -> None:
        super().__init__()
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(
                f"widths must be three positive channel counts, got {widths}; e.g. (32, 64, 128)"
            )
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1 residual block per stage, got {blocks}")
        w1, w2, w3 = widths
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w1, 3, padding=1, bias=False),
            nn.BatchNorm2d(w1),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        channels = w1
        for stage, width in enumerate(widths):
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(BasicBlock(channels, width, stride))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(w3, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
