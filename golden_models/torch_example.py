"""A small PyTorch module for the README's `iropt export` example (needs torch)."""

from __future__ import annotations

from typing import Any


def small_convnet() -> Any:
    """Conv + BatchNorm + ReLU, pooled into a linear head: 3x32x32 images, 10 classes."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
