"""A small 3-D U-Net for lung-nodule segmentation (reference model, torch).

Two down-sampling levels, 8 base channels: small enough to train on CPU in
minutes and to export to a < 5 MB ONNX file, big enough to separate solid and
part-solid nodules from vessels-free lung, chest wall and mediastinum in the
synthetic phantoms. Input: windowed CT in [0, 1], ``[batch, 1, z, y, x]`` with
z, y, x divisible by 4. Output: per-voxel nodule probability (sigmoid in the
graph, so every engine returns probabilities).
"""
from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int, convs: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv3d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False),
                   nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class UNet3D(nn.Module):
    """U-Net with levels at full, 1/2 and 1/4 resolution."""

    def __init__(self, base_channels: int = 8):
        super().__init__()
        c = base_channels
        # Full resolution holds the most voxels: keep its convolutions few and thin.
        self.enc0 = _block(1, c, convs=1)
        self.enc1 = _block(c, 2 * c)
        self.bottom = _block(2 * c, 4 * c)
        self.up1 = nn.ConvTranspose3d(4 * c, 2 * c, 2, stride=2)
        self.dec1 = _block(4 * c, 2 * c)
        self.up0 = nn.ConvTranspose3d(2 * c, c, 2, stride=2)
        self.dec0 = _block(2 * c, c, convs=1)
        self.head = nn.Conv3d(c, 1, 1)
        self.pool = nn.MaxPool3d(2)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        e0 = self.enc0(x)
        e1 = self.enc1(self.pool(e0))
        b = self.bottom(self.pool(e1))
        d1 = self.dec1(torch.cat([self.up1(b), e1], dim=1))
        d0 = self.dec0(torch.cat([self.up0(d1), e0], dim=1))
        return self.head(d0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))
