"""Small models written with BatchNorm, as users write them: the bundled fixtures and the test and benchmark
networks. Import specs: ``graphnorm.zoo:DigitsCNN``, ``graphnorm.zoo:TinyMLP``."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["DigitsCNN", "TinyMLP"]


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 grey digits (sklearn's digits): two conv-BN-ReLU-maxpool stages and a Linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(32 * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class TinyMLP(nn.Module):
    """A two-layer MLP with BatchNorm1d on 64 features (flattened 8x8 digits)."""

    def __init__(self, features: int = 64, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
