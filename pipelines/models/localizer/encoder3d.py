"""3-D CNN image encoders of HCL-AL, with module names that load published weights strictly.

Two families (HCL-AL, Gao et al. 2025):

* ``ResidualNet3D`` (net ``ClipText_ResidualNet``, the published coarse and fine models):
  ``in_block`` (3x3x3 conv 3→16 + BN + ReLU), then four ``DownBlock``s 16→32→64→128→256,
  each a 2x2x2 stride-2 conv + BN + ReLU followed by a residual block of 1, 2, 3, 3
  3x3x3 conv/BN units (ReLU between units, none after the last; output
  ``relu(ops(x) + x)``), then flatten in C order and ``fc`` → embedding.
* ``BasicNet3D`` (nets ``ClipText_BasicNet*`` and ``ClipText_Fc_BasicNet``): the same
  ``in_block``, then four 3x3x3 stride-2 pad-1 conv + BN + ReLU blocks, flatten, ``fc``.

Because the head is flatten + Linear, the input layout ``[B, C, X, Y, Z]`` (x = patient
right→left, y = anterior→posterior, z = inferior→superior) is part of the weights; see
:mod:`pipelines.models.localizer.crop`.  BatchNorm is used in eval mode (running
statistics), so a lesion's embedding does not depend on the rest of its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

MAX_STRIDE = 16
WIDTHS = (16, 32, 64, 128, 256)


class InputBlock(nn.Module):
    """3x3x3 conv (with bias) + BN + ReLU: ``in_block.{conv,bn}``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm3d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution, batch norm, activation."""
        return self.act(self.bn(self.conv(x)))


class ResidualBlock3(nn.Module):
    """``ops.{k}.0`` conv, ``ops.{k}.1`` BN; ReLU after every unit but the last; skip + ReLU."""

    def __init__(self, channels: int, convs: int) -> None:
        super().__init__()
        if convs <= 0:
            raise ValueError("a residual block needs at least one convolution")
        self.ops = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(channels, channels, kernel_size=3, stride=1, padding=1),
                nn.BatchNorm3d(channels),
                nn.ReLU() if i < convs - 1 else nn.Identity(),
            )
            for i in range(convs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's operations in order, plus the skip connection."""
        out = x
        for op in self.ops:
            out = op(out)
        return torch.relu(out + x)


class DownBlock(nn.Module):
    """``down_conv`` (2x2x2, stride 2, doubles channels) + ``down_bn`` + ReLU + ``rblock``."""

    def __init__(self, in_channels: int, convs: int) -> None:
        super().__init__()
        out = in_channels * 2
        self.down_conv = nn.Conv3d(in_channels, out, kernel_size=2, stride=2)
        self.down_bn = nn.BatchNorm3d(out)
        self.down_act = nn.ReLU(inplace=True)
        self.rblock = ResidualBlock3(out, convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Strided downsampling, then the residual block."""
        return self.rblock(self.down_act(self.down_bn(self.down_conv(x))))


class BasicBlock(nn.Module):
    """``conv`` (3x3x3, stride 2, pad 1, doubles channels) + ``bn`` + ReLU."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, in_channels * 2, kernel_size=3, stride=2, padding=1)
        self.bn = nn.BatchNorm3d(in_channels * 2)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution, batch norm, activation."""
        return self.act(self.bn(self.conv(x)))


def fc_in_features(crop_size: Sequence[int]) -> int:
    """Input width of the final linear layer for a crop size (crop must be divisible by the total stride)."""
    if any(int(c) % MAX_STRIDE for c in crop_size):
        raise ValueError(f"crop size {tuple(crop_size)} must be divisible by {MAX_STRIDE}")
    return WIDTHS[-1] * math.prod(int(c) // MAX_STRIDE for c in crop_size)


class _Encoder3D(nn.Module):
    in_block: InputBlock
    down_32: nn.Module
    down_64: nn.Module
    down_128: nn.Module
    down_256: nn.Module
    fc: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_block(x)
        x = self.down_256(self.down_128(self.down_64(self.down_32(x))))
        return self.fc(torch.flatten(x, 1))  # C-order flatten of [B, 256, X/16, Y/16, Z/16]


class ResidualNet3D(_Encoder3D):
    """HCL-AL's residual 3-D image encoder (key layout of its ``params.pth``)."""
    def __init__(self, in_channels: int, crop_size: Sequence[int], num_features: int = 512) -> None:
        super().__init__()
        self.in_block = InputBlock(in_channels, WIDTHS[0])
        self.down_32 = DownBlock(16, 1)
        self.down_64 = DownBlock(32, 2)
        self.down_128 = DownBlock(64, 3)
        self.down_256 = DownBlock(128, 3)
        self.fc = nn.Linear(fc_in_features(crop_size), num_features)


class BasicNet3D(_Encoder3D):
    """HCL-AL's plain 3-D image encoder (key layout of its ``params.pth``)."""
    def __init__(self, in_channels: int, crop_size: Sequence[int], num_features: int = 512) -> None:
        super().__init__()
        self.in_block = InputBlock(in_channels, WIDTHS[0])
        self.down_32 = BasicBlock(16)
        self.down_64 = BasicBlock(32)
        self.down_128 = BasicBlock(64)
        self.down_256 = BasicBlock(128)
        self.fc = nn.Linear(fc_in_features(crop_size), num_features)


def init_weights(module: nn.Module) -> None:
    """HCL-AL training initialisation: Kaiming-normal conv/linear, zero bias, BN weight ~ N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
