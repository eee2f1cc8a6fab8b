"""Small models written with BatchNorm, as users write them, for the conversion tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_chain(channels: int = 3, width: int = 8, depth: int = 3, seed: int = 0) -> nn.Sequential:
    """conv-BN-ReLU blocks with random BatchNorm affine parameters."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        bn = nn.BatchNorm2d(width)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
        layers += [nn.Conv2d(channels, width, 3, padding=1), bn, nn.ReLU()]
        channels = width
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits, with BatchNorm."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class SharedBatchNorm(nn.Module):
    """One BatchNorm module called at two sites, and a conv whose output feeds a BatchNorm and a skip."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.conv_c = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_c = nn.BatchNorm2d(4)

    def forward(self, x):
        a = F.relu(self.bn(self.conv_a(x)))
        b = self.bn(self.conv_b(x) * 3.0)
        c = self.conv_c(a + b)
        return F.relu(self.bn_c(c)) + c


class EveryForm(nn.Module):
    """Every BatchNorm spelling: 1d/2d/3d modules, SyncBatchNorm, F.batch_norm, torch.batch_norm,
    affine=False, track_running_stats=False, BatchNorm1d on (N, C, L) after a Linear on L."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.sync = nn.SyncBatchNorm(4)
        self.bn_plain = nn.BatchNorm2d(4, affine=False)
        self.bn_batch_only = nn.BatchNorm2d(4, track_running_stats=False)
        self.conv3d = nn.Conv3d(4, 2, 1)
        self.bn3d = nn.BatchNorm3d(2)
        self.register_buffer("f_mean", torch.zeros(2))
        self.register_buffer("f_var", torch.ones(2))
        self.f_weight = nn.Parameter(torch.tensor([1.5, 0.5]))
        self.f_bias = nn.Parameter(torch.tensor([0.2, -0.2]))
        self.seq_linear = nn.Linear(8, 8)
        self.bn_seq = nn.BatchNorm1d(4)
        self.linear = nn.Linear(4 * 8 + 2, 6)
        self.bn1d = nn.BatchNorm1d(6)

    def forward(self, x):
        y = F.relu(self.sync(self.conv(x)))
        y = self.bn_batch_only(self.bn_plain(y))
        z = self.bn3d(self.conv3d(y.unsqueeze(2))).squeeze(2)
        z = F.batch_norm(z, self.f_mean, self.f_var, self.f_weight, self.f_bias, False, 0.1, 1e-5)
        z = torch.batch_norm(z, self.f_weight, self.f_bias, self.f_mean, self.f_var, False, 0.1, 1e-5, False)
        pooled = F.adaptive_avg_pool2d(y, (2, 4)).flatten(2)  # (N, 4, 8)
        seq = self.bn_seq(self.seq_linear(pooled))  # BatchNorm1d on (N, C, L): normalizes dim 1, not L
        features = torch.cat([seq.flatten(1), F.adaptive_avg_pool2d(z, 1).flatten(1)], 1)
        return self.bn1d(self.linear(features))


class TinyResNet(nn.Module):
    """ResNet's shape in miniature: a 7x7/2 stem, BatchNorm, ReLU, a 3x3/2 max-pool, a basic block and a
    downsampling block with a 1x1 projection, global pooling and a classifier."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.block = _BasicBlock(width, width, 1)
        self.down = _BasicBlock(width, 2 * width, 2)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.down(self.block(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.project = None
        if stride != 1 or inputs != outputs:
            self.project = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):
        skip = x if self.project is None else self.project(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + skip)


class TinyMobile(nn.Module):
    """The mobile families in miniature: an inverted residual (1x1 expansion, ReLU6, depthwise 3x3, Hardswish,
    squeeze-excitation with SiLU and a sigmoid gate, 1x1 projection, skip), then a GELU head block."""

    def __init__(self, width: int = 8, expand: int = 3, classes: int = 10):
        super().__init__()
        hidden = width * expand
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.Hardswish())
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden, 4, 1), nn.SiLU(),
                                     nn.Conv2d(4, hidden, 1), nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(hidden, width, 1, bias=False), nn.BatchNorm2d(width))
        self.tail = nn.Sequential(nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.GELU())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.stem(x)
        y = self.depthwise(self.expand(x))
        x = x + self.project(y * self.squeeze(y))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.tail(x), 1), 1))
