"""A hypothesis strategy for random valid networks with BatchNorm: convolutions with random groups, strides,
padding and dilation, BatchNorm 1d/2d, every supported activation, pooling, residual adds, concatenation,
flatten, a module called twice, random shapes. The generated network is plain torch (``nn.Module``), described
by a readable ``spec`` that hypothesis prints when a property fails."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from hypothesis import strategies as st

ACTIVATIONS = {
    "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "softplus": nn.Softplus, "relu6": nn.ReLU6, "hardtanh": nn.Hardtanh,
    "mish": nn.Mish, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "identity": nn.Identity,
}


class ConvBlock(nn.Module):
    """conv -> BatchNorm2d -> activation, optionally with a residual add (when the shape is kept)."""

    def __init__(self, conv: nn.Conv2d, activation: str, residual: bool):
        super().__init__()
        self.conv, self.bn, self.act = conv, nn.BatchNorm2d(conv.out_channels), ACTIVATIONS[activation]()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        return x + y if self.residual else y


class Concat(nn.Module):
    """Two convolution branches of the same input, concatenated over channels."""

    def __init__(self, left: ConvBlock, right: ConvBlock):
        super().__init__()
        self.left, self.right = left, right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.left(x), self.right(x)], dim=1)


class Twice(nn.Module):
    """One shape-keeping module called twice (a shared module: two call sites, one set of weights)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.block(x))


class Network(nn.Module):
    def __init__(self, body: list[nn.Module], features: int, hidden: int, activation: str, classes: int):
        super().__init__()
        self.body = nn.Sequential(*body)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.BatchNorm1d(hidden),
                                  ACTIVATIONS[activation](), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@st.composite
def conv_block(draw, channels: int, size: int, keep_shape: bool = False) -> tuple[ConvBlock, int, int, str]:
    kernel = draw(st.sampled_from([1, 3]))
    dilation = draw(st.sampled_from([1, 2])) if kernel == 3 and size >= 5 else 1
    if keep_shape:
        stride, padding, out_channels = 1, dilation * (kernel - 1) // 2, channels
    else:
        stride = draw(st.sampled_from([1, 2]))
        padding = draw(st.integers(0, dilation * (kernel - 1)))
        out_channels = draw(st.integers(2, 8))
    if _out_size(size, kernel, stride, padding, dilation) < 1:
        stride, padding = 1, dilation * (kernel - 1) // 2
    divisors = [g for g in range(1, channels + 1) if channels % g == 0 and out_channels % g == 0]
    groups = draw(st.sampled_from(divisors))
    activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
    conv = nn.Conv2d(channels, out_channels, kernel, stride, padding, dilation, groups,
                     bias=draw(st.booleans()))
    residual = keep_shape and draw(st.booleans())
    out_size = _out_size(size, kernel, stride, padding, dilation)
    text = (f"conv({channels}->{out_channels}, k{kernel} s{stride} p{padding} d{dilation} g{groups})+bn+{activation}"
            f"{'+residual' if residual else ''}")
    return ConvBlock(conv, activation, residual), out_channels, out_size, text


@st.composite
def networks(draw) -> tuple[Network, tuple[int, ...], str]:
    """``(network, input shape with batch 1, description)``; weights and BatchNorm affine parameters random."""
    channels, size = draw(st.integers(1, 4)), draw(st.integers(4, 10))
    shape = (1, channels, size, size)
    body, spec = [], []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "residual", "concat", "twice", "maxpool", "avgpool",
                                     "adaptive"]))
        if kind in ("maxpool", "avgpool") and size >= 2:
            body.append(nn.MaxPool2d(2) if kind == "maxpool" else nn.AvgPool2d(2))
            size //= 2
            spec.append(kind)
        elif kind == "adaptive":
            size = draw(st.integers(1, size))
            body.append(nn.AdaptiveAvgPool2d(size))
            spec.append(f"adaptive_avg_pool({size})")
        elif kind == "concat":
            left, left_channels, left_size, left_text = draw(conv_block(channels, size, keep_shape=True))
            right, right_channels, _, right_text = draw(conv_block(channels, size, keep_shape=True))
            body.append(Concat(left, right))
            channels, size = left_channels + right_channels, left_size
            spec.append(f"concat[{left_text} | {right_text}]")
        elif kind == "twice":
            block, _, _, text = draw(conv_block(channels, size, keep_shape=True))
            body.append(Twice(block.conv))  # the shared module is the conv: a BatchNorm holds one site's stats
            body.append(ConvBlock(nn.Conv2d(channels, channels, 1), "relu", False))
            spec.append(f"twice[{text.split('+')[0]}] + conv1x1+bn+relu")
        else:
            block, channels, size, text = draw(conv_block(channels, size, keep_shape=kind == "residual"))
            body.append(block)
            spec.append(text)
    hidden = draw(st.integers(2, 8))
    activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
    network = Network(body, channels * size * size, hidden, activation, draw(st.integers(2, 5)))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.3)
    spec.append(f"flatten+linear({channels * size * size}->{hidden})+bn1d+{activation}+linear; seed {seed}")
    assert math.prod(shape) > 0
    return network.eval(), shape, " ; ".join(spec)
