"""CBAM (Woo et al. 2018) as used by diversified ESR and MA-Net (SPEC section 2).

Channel gate then spatial gate; both attention maps are returned because they are
what the notebooks show and what ESR diversifies. Nothing else lives here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelGate(nn.Module):
    """Shared MLP ``C -> C/r -> C`` on the average- and max-pooled vectors, summed, sigmoid.

    ``(B, C, H, W) -> (B, C)`` attention in ``(0, 1)``.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pooling ops rather than mean/amax reductions: max-pool's backward scatters through
        # its indices instead of comparing the whole map with its max (1.1x faster on CPU)
        avg = F.adaptive_avg_pool2d(x, 1).flatten(1)
        mx = F.adaptive_max_pool2d(x, 1).flatten(1)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))


class SpatialGate(nn.Module):
    """Channel-max and channel-mean -> 7x7 conv (2 -> 1, no bias) -> BatchNorm -> sigmoid.

    ``(B, C, H, W) -> (B, H, W)`` attention in ``(0, 1)``. BatchNorm momentum 0.01
    (PyTorch convention) as in the reference CBAM.
    """

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.max(dim=1, keepdim=True).values, x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.bn(self.conv(pooled))).squeeze(1)


class CBAM(nn.Module):
    """Convolutional Block Attention Module.

    ``forward(x)`` with ``x`` ``(B, C, H, W)`` returns ``(refined, channel_att, spatial_att)``:
    the refined map ``(B, C, H, W)``, channel attention ``(B, C)`` and spatial attention
    ``(B, H, W)``. Parameters: ``2*C*C/r + C/r + C + 98 + 2`` (680 for C = 64, r = 16).
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.channel_gate = ChannelGate(channels, reduction)
        self.spatial_gate = SpatialGate(kernel_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ca = self.channel_gate(x)
        x = x * ca[:, :, None, None]
        sa = self.spatial_gate(x)
        return x * sa[:, None, :, :], ca, sa
