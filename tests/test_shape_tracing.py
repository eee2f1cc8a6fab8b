"""Shape-aware tracing: Python that branches on shapes takes its branch for the given input shape."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphnorm
from graphnorm import InputStats, TraceError


class SamePadding(nn.Module):
    """TensorFlow-style 'same' padding as timm writes it: sizes read in Python, a branch on them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        ih, iw = x.size()[-2:]
        pad_h = max((math.ceil(ih / 2) - 1) * 2 + 3 - ih, 0)
        pad_w = max((math.ceil(iw / 2) - 1) * 2 + 3 - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        y = self.bn(self.conv(x))
        batch, channels, height, width = y.shape
        return y.reshape(batch, channels, height * width).mean(-1)


def test_plain_tracing_fails_and_shapes_take_the_branch() -> None:
    model = SamePadding().eval()
    with pytest.raises(TraceError, match="control flow"):
        graphnorm.trace(model)
    traced = graphnorm.trace(model, input_shape=(1, 3, 8, 8))
    assert traced.meta["graphnorm.capture"] == "symbolic with shapes"
    assert any("x.size()[-2:]" in where for where in traced.meta["graphnorm.specialized"])
    x = torch.randn(5, 3, 8, 8)  # the batch dim stays symbolic: any batch size runs
    torch.testing.assert_close(traced(x), model(x))


def test_conversion_records_the_capture_and_is_batch_independent() -> None:
    model = SamePadding().eval()
    converted = graphnorm.convert(model, InputStats.standard(3), input_shape=(1, 3, 8, 8), agreement_samples=0)
    log = converted.graphnorm_log
    assert log.capture == "symbolic with shapes" and log.specialized and len(log.rewritten) == 1
    assert "specialized to the input shape" in str(log)
    x = torch.randn(6, 3, 8, 8)
    torch.testing.assert_close(converted(x), torch.cat([converted(x[i:i + 1]) for i in range(6)]))


def test_data_dependent_branches_still_fail_clearly() -> None:
    class DataBranch(nn.Module):
        def forward(self, x):
            return x.relu() if x.sum() > 0 else -x

    with pytest.raises(TraceError, match="control flow"):
        graphnorm.trace(DataBranch(), input_shape=(1, 3))
