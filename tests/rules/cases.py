"""Monte-Carlo cases, one or more per registered moment rule.

A case is a small module run on Gaussian input: graphnorm propagates the input statistics through its traced
graph, and the moments of the module's output are estimated from 10^5 real forward draws. The op keys a
case exercises are read off its traced graph, so tests/rules/test_coverage.py can assert that every
registered rule has a case. ``rtol`` is an allowance beyond Monte-Carlo noise for rules that approximate on
purpose; ``why`` justifies it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import StochasticDepth, stochastic_depth

# Channel means and stds that span small and large |mean/std| (up to 5 and down to -3).
WIDE_MEAN = [0.0, 2.0, -3.0, 0.5, 10.0, -1.0]
WIDE_STD = [1.0, 0.5, 1.0, 4.0, 2.0, 0.1]


@dataclass
class Case:
    id: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]  # one sample, no batch dim
    mean: list[float] = field(default_factory=lambda: list(WIDE_MEAN))
    std: list[float] = field(default_factory=lambda: list(WIDE_STD))
    spatial: bool = False
    crop: int = 0  # compare channel moments on the interior only (rules that ignore borders)
    train: bool = False
    rtol: float = 0.0
    why: str = ""


class Lambda(nn.Module):
    """A module whose forward is a traced-through function (so torch.*, F.* and method spellings appear)."""

    def __init__(self, fn: Callable, *modules: nn.Module):
        super().__init__()
        self.fn = fn
        self.parts = nn.ModuleList(modules)

    def forward(self, x):
        return self.fn(x, *self.parts)


class FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.4)
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, stride=1, padding=0)


class FunctionalBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("running_mean", torch.tensor([0.3, -1.0, 2.0]))
        self.register_buffer("running_var", torch.tensor([0.5, 2.0, 1.5]))
        self.weight = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))
        self.bias = nn.Parameter(torch.tensor([0.1, 0.2, -0.3]))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-3)


def seeded(factory: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(seed)
        return factory()

    return build


def batch_norm_eval(kind: type, channels: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(1)
        bn = kind(channels)
        bn.running_mean.copy_(torch.randn(channels))
        bn.running_var.copy_(torch.rand(channels) + 0.5)
        bn.weight.data.copy_(torch.randn(channels))
        bn.bias.data.copy_(torch.randn(channels))
        return bn.eval()

    return build


# For clamps the bounds must not sit more than ~3.5 std from a mean: beyond that the clipped mass is below
# 1/10^4 and 10^5 draws see too few clipped values to estimate its effect (the standard error itself breaks).
CLAMP_MEAN, CLAMP_STD = [0.0, 1.0, -1.5, 0.5, 3.0, -0.7], [1.0, 0.5, 1.0, 4.0, 0.5, 0.1]
IN3_MEAN, IN3_STD = [0.5, -1.0, 2.0], [1.0, 0.5, 2.0]
IN2_MEAN, IN2_STD = [0.0, 1.0], [1.0, 2.0]

CASES: list[Case] = [
    # -- affine ---------------------------------------------------------------------------------------------------
    Case("linear", seeded(lambda: nn.Linear(6, 4)), (6,)),
    Case("linear-on-3d-per-channel", seeded(lambda: nn.Linear(5, 3)), (2, 5), mean=[0.5, -1.0], std=[1.0, 2.0]),
    Case("linear-functional", seeded(lambda: Lambda(lambda x, lin: F.linear(x, lin.weight, lin.bias), nn.Linear(6, 2))),
         (6,)),
    Case("conv2d", seeded(lambda: nn.Conv2d(3, 4, 3)), (3, 7, 7), IN3_MEAN, IN3_STD),
    Case("conv2d-stride-pad-dilation-per-unit", seeded(lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2)),
         (3, 9, 9), IN3_MEAN, IN3_STD, spatial=True),
    Case("conv2d-groups-per-unit", seeded(lambda: nn.Conv2d(4, 4, 3, padding=1, groups=2)), (4, 6, 6),
         [0.0, 1.0, -1.0, 0.5], [1.0, 0.5, 2.0, 1.0], spatial=True),
    Case("conv2d-reflect-interior", seeded(lambda: nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect")), (3, 8, 8),
         IN3_MEAN, IN3_STD, crop=1),
    Case("conv2d-depthwise", seeded(lambda: nn.Conv2d(3, 3, 3, groups=3)), (3, 6, 6), IN3_MEAN, IN3_STD),
    Case("conv2d-depthwise-strided-per-unit", seeded(lambda: nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3)),
         (3, 7, 7), IN3_MEAN, IN3_STD, spatial=True),
    Case("conv1d", seeded(lambda: nn.Conv1d(3, 4, 3)), (3, 10), IN3_MEAN, IN3_STD),
    Case("conv3d", seeded(lambda: nn.Conv3d(3, 2, 2)), (3, 4, 4, 4), IN3_MEAN, IN3_STD),
    Case("conv2d-functional", seeded(FunctionalConv), (3, 6, 6), IN3_MEAN, IN3_STD),
    Case("conv-transpose2d-interior", seeded(lambda: nn.ConvTranspose2d(3, 4, 4, stride=2)), (3, 6, 6),
         IN3_MEAN, IN3_STD, crop=3),
    Case("conv-transpose2d-per-unit",
         seeded(lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1)), (3, 5, 5),
         IN3_MEAN, IN3_STD, spatial=True),
    Case("conv-transpose1d-groups-interior", seeded(lambda: nn.ConvTranspose1d(4, 2, 4, stride=2, groups=2)), (4, 8),
         [0.0, 1.0, -1.0, 0.5], [1.0, 0.5, 2.0, 1.0], crop=4),
    Case("batchnorm2d-eval", batch_norm_eval(nn.BatchNorm2d, 3), (3, 4, 4), IN3_MEAN, IN3_STD),
    Case("batchnorm1d-eval-features", batch_norm_eval(nn.BatchNorm1d, 6), (6,)),
    Case("batchnorm1d-eval-3d", batch_norm_eval(nn.BatchNorm1d, 2), (2, 5), IN2_MEAN, IN2_STD),
    Case("batchnorm2d-train", seeded(lambda: nn.BatchNorm2d(3)), (3, 4, 4), IN3_MEAN, IN3_STD, train=True,
         rtol=2e-3, why="batch statistics of 10^4 x 16 values differ from the population ones by ~1e-3 of the std"),
    Case("batch-norm-functional", seeded(FunctionalBatchNorm), (3, 4, 4), IN3_MEAN, IN3_STD),
    # -- activations ----------------------------------------------------------------------------------------------
    Case("relu", nn.ReLU, (6,)),
    Case("relu-method", lambda: Lambda(lambda x: x.relu()), (6,)),
    Case("relu6", nn.ReLU6, (6,)),
    Case("leaky-relu", lambda: nn.LeakyReLU(0.2), (6,)),
    Case("hardtanh", lambda: nn.Hardtanh(-2.0, 1.5), (6,), CLAMP_MEAN, CLAMP_STD),
    Case("clamp", lambda: Lambda(lambda x: x.clamp(min=-0.5, max=2.0)), (6,), CLAMP_MEAN, CLAMP_STD),
    Case("clamp-min-only", lambda: Lambda(lambda x: torch.clamp(x, min=1.0)), (6,), CLAMP_MEAN, CLAMP_STD),
    Case("hardsigmoid", nn.Hardsigmoid, (6,)),
    Case("hardswish", nn.Hardswish, (6,)),
    Case("sigmoid", nn.Sigmoid, (6,)),
    Case("tanh", lambda: Lambda(torch.tanh), (6,)),
    Case("gelu", nn.GELU, (6,)),
    Case("gelu-tanh", lambda: nn.GELU(approximate="tanh"), (6,)),
    Case("silu", nn.SiLU, (6,)),
    Case("elu", lambda: nn.ELU(0.7), (6,)),
    Case("softplus", lambda: nn.Softplus(beta=2.0), (6,)),
    Case("mish", nn.Mish, (6,)),
    # -- pooling --------------------------------------------------------------------------------------------------
    Case("maxpool2d", lambda: nn.MaxPool2d(3, 2), (2, 9, 9), IN2_MEAN, IN2_STD),
    Case("maxpool1d", lambda: Lambda(lambda x: F.max_pool1d(x, 4)), (2, 16), IN2_MEAN, IN2_STD),
    Case("relu-then-maxpool2d", lambda: nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)), (2, 8, 8), [-1.0, 0.5],
         [1.0, 2.0]),
    Case("sigmoid-then-maxpool2d", lambda: nn.Sequential(nn.Sigmoid(), nn.MaxPool2d(3, 3)), (2, 9, 9), [-1.0, 0.5],
         [1.0, 2.0]),
    Case("relu-then-maxpool2d-padded-per-unit", lambda: nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, 2, padding=1)),
         (2, 7, 7), [-1.0, 0.5], [1.0, 2.0], spatial=True),
    Case("maxpool2d-padded-per-unit", lambda: nn.MaxPool2d(3, 2, padding=1), (2, 7, 7), IN2_MEAN, IN2_STD,
         spatial=True),
    Case("maxpool2d-ceil-dilated-per-unit", lambda: nn.MaxPool2d(2, 2, dilation=2, ceil_mode=True), (2, 7, 7),
         IN2_MEAN, IN2_STD, spatial=True),
    Case("avgpool2d", lambda: nn.AvgPool2d(2), (2, 6, 6), IN2_MEAN, IN2_STD),
    Case("avgpool2d-divisor", lambda: nn.AvgPool2d(2, divisor_override=3), (2, 6, 6), IN2_MEAN, IN2_STD),
    Case("avgpool2d-padded-per-unit",
         lambda: nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False), (2, 8, 8),
         IN2_MEAN, IN2_STD, spatial=True),
    Case("avgpool1d-padded-per-unit", lambda: nn.AvgPool1d(3, stride=1, padding=1), (2, 8), IN2_MEAN, IN2_STD,
         spatial=True),
    Case("adaptive-avgpool2d", lambda: nn.AdaptiveAvgPool2d((3, 3)), (2, 7, 7), IN2_MEAN, IN2_STD),
    Case("adaptive-avgpool2d-up-and-down-per-unit", lambda: nn.AdaptiveAvgPool2d((5, 3)), (2, 4, 7),
         IN2_MEAN, IN2_STD, spatial=True),
    Case("adaptive-avgpool1d", lambda: Lambda(lambda x: F.adaptive_avg_pool1d(x, 3)), (2, 7), IN2_MEAN, IN2_STD),
    # -- structural -----------------------------------------------------------------------------------------------
    Case("dropout-train", lambda: nn.Dropout(0.3), (6,), train=True),
    Case("dropout-eval", lambda: nn.Dropout(0.3), (6,)),
    Case("identity", nn.Identity, (6,)),
    Case("flatten", seeded(lambda: nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten())), (2, 4, 4), IN2_MEAN, IN2_STD),
    Case("view-size", seeded(lambda: Lambda(lambda x, c: c(x).view(x.size(0), -1), nn.Conv2d(2, 3, 2))), (2, 4, 4),
         IN2_MEAN, IN2_STD),
    Case("reshape-per-unit", lambda: Lambda(lambda x: x.reshape(x.shape[0], 4, -1)), (2, 4, 4), IN2_MEAN, IN2_STD,
         spatial=True),
    Case("add-constant", lambda: Lambda(lambda x: x + 2.5), (6,)),
    Case("add-self", lambda: Lambda(lambda x: x + x), (6,)),
    Case("add-channel-tensor-alpha",
         lambda: Lambda(lambda x: torch.add(x, torch.arange(2.0).reshape(2, 1, 1), alpha=2)), (2, 3, 3),
         IN2_MEAN, IN2_STD),
    Case("add-spatial-tensor", lambda: Lambda(lambda x: x + torch.linspace(-1, 1, 9).reshape(3, 3)), (2, 3, 3),
         IN2_MEAN, IN2_STD),
    Case("sub-from-constant", lambda: Lambda(lambda x: 1.0 - x), (6,)),
    Case("sub-self", lambda: Lambda(lambda x: x - x), (6,)),
    Case("mul-constant", lambda: Lambda(lambda x: x * 3.0), (6,)),
    Case("mul-self", lambda: Lambda(lambda x: x * x), (6,)),
    Case("mul-channel-tensor", lambda: Lambda(lambda x: x.mul(torch.tensor([[[-1.0]], [[2.0]]]))), (2, 3, 3),
         IN2_MEAN, IN2_STD),
    Case("div-constant", lambda: Lambda(lambda x: x / 4.0), (6,)),
    Case("neg", lambda: Lambda(lambda x: -x), (6,)),
    Case("cat-channels", lambda: Lambda(lambda x: torch.cat([x, F.relu(x)], dim=1)), (2, 3, 3), IN2_MEAN, IN2_STD),
    Case("cat-positions", lambda: Lambda(lambda x: torch.cat([x, x * 2.0], dim=2)), (2, 3, 3), IN2_MEAN, IN2_STD),
]


@dataclass
class BinaryCase:
    """A rule applied to two independent random operands (a graph cannot hold two independent activations
    of one input, so these call the rule directly)."""

    id: str
    key: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    params: dict = field(default_factory=dict)


BINARY_CASES = [
    BinaryCase("add-independent", "add", lambda a, b: a + b),
    BinaryCase("add-independent-alpha", "add", lambda a, b: a + 0.5 * b, {"alpha": 0.5}),
    BinaryCase("sub-independent", "sub", lambda a, b: a - b),
    BinaryCase("mul-independent", "mul", lambda a, b: a * b),
]


# -- graphnorm's own normalizer modules, inside converted models ---------------------------------------------------
def conv_bn_relu_bn() -> nn.Module:
    """Conv (no padding) -> BN -> ReLU -> BN: every unit of it has exact analytic moments (independent
    Gaussian inputs to the conv, exact ReLU rule, BatchNorm on a known distribution)."""
    torch.manual_seed(2)
    first, second = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
    with torch.no_grad():
        for bn in (first, second):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), first, nn.ReLU(), second)


def conv_bn() -> nn.Module:
    """Conv -> BN only: with BatchNorm noise in training, the output moments are exact (the noise makes the
    normalized values non-Gaussian, so a nonlinearity after it would test the Gaussian assumption instead)."""
    return conv_bn_relu_bn()[:2]


def converted(mode: str, *, stochastic_batch: int | None = None, mean=IN3_MEAN, std=IN3_STD,
              factory: Callable[[], nn.Module] | None = None, noise: str = "batch") -> Callable[[], nn.Module]:
    def build() -> nn.Module:

        import graphnorm
        from graphnorm.noise import LearnedNoise

        model = factory() if factory is not None else conv_bn_relu_bn()
        result = graphnorm.convert(model, graphnorm.InputStats(mean, std), input_shape=(1, 3, 6, 6), mode=mode,
                                   stochastic_batch=stochastic_batch, noise=noise)
        with torch.no_grad():  # a learned posterior away from its BatchNorm initialisation, different per channel
            for module in result.modules():
                if isinstance(module, LearnedNoise):
                    channels = torch.arange(module.log_sigma_scale.shape[0], dtype=torch.float32)
                    module.log_sigma_scale.copy_(torch.log(0.2 + 0.1 * channels))
                    module.log_sigma_shift.copy_(torch.log(0.6 / (1 + channels)))
        return result

    return build


CASES += [
    Case("converted-analytic", converted("analytic"), (3, 6, 6), IN3_MEAN, IN3_STD),
    Case("converted-analytic-stochastic-train", converted("analytic", stochastic_batch=8, factory=conv_bn),
         (3, 6, 6), IN3_MEAN, IN3_STD, train=True),
    Case("converted-analytic-learned-noise-train", converted("analytic", noise="learned", factory=conv_bn),
         (3, 6, 6), IN3_MEAN, IN3_STD, train=True),
    Case("converted-reparam", converted("reparam"), (3, 6, 6), IN3_MEAN, IN3_STD),
    Case("converted-reparam-learned-noise-train", converted("reparam", noise="learned", factory=conv_bn),
         (3, 6, 6), IN3_MEAN, IN3_STD, train=True),
    Case("converted-reparam-stochastic-train", converted("reparam", stochastic_batch=8, factory=conv_bn),
         (3, 6, 6), IN3_MEAN, IN3_STD, train=True),
    Case("converted-normprop", converted("normprop"), (3, 6, 6), IN3_MEAN, IN3_STD),
    Case("converted-fixed", converted("fixed"), (3, 6, 6), IN3_MEAN, IN3_STD),
]


# -- layout, reductions, products, per-sample normalizations (issue 10) -----------------------------------------
IN4_MEAN, IN4_STD = [0.5, -1.0, 2.0, 0.0], [1.0, 0.5, 2.0, 1.5]


def _timm_drop_path() -> nn.Module:
    from timm.layers import DropPath

    return DropPath(0.3)


def _torchvision_stochastic_depth() -> nn.Module:
    """The function form (autowrapped by the tracer: a call node, not its insides) after the module form."""
    return Lambda(lambda x, module: stochastic_depth(module(x), 0.2, "row", True), StochasticDepth(0.3, "row"))


def _layer_norm_2d() -> nn.Module:
    """timm's LayerNorm2d pattern: channels last, LayerNorm over channels, channels first again."""
    norm = nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return Lambda(lambda x, ln: ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), norm)


SIXTEEN_MEAN = [float(v) for v in torch.linspace(-2, 2, 16)]
SIXTEEN_STD = [float(v) for v in torch.linspace(0.5, 2, 16)]
# per-sample normalizations: the rule keeps the 1/D terms of the fluctuation of the sample's own statistics and
# drops the 1/D^2 ones (feature_norms.py); 2% of the std, 4% of the variance, covers D = 16
NORM_TOLERANCE = dict(rtol=0.02, why="second-order expansion in the sample statistics' fluctuation (feature_norms.py)")

CASES += [
    Case("mean-spatial-keepdim", lambda: Lambda(lambda x: x.mean((2, 3), keepdim=True)), (2, 4, 4), IN2_MEAN, IN2_STD),
    Case("mean-channels-per-unit", lambda: Lambda(lambda x: torch.mean(x, dim=1)), (2, 3, 4), IN2_MEAN, IN2_STD,
         spatial=True),
    Case("sum-last-dim", lambda: Lambda(lambda x: x.sum(-1)), (2, 3, 4), IN2_MEAN, IN2_STD),
    Case("getitem-channel-slice", lambda: Lambda(lambda x: x[:, 1:]), (3, 2, 2), IN3_MEAN, IN3_STD),
    Case("getitem-position-per-unit", lambda: Lambda(lambda x: x[..., 0, 1:]), (3, 3, 3), IN3_MEAN, IN3_STD,
         spatial=True),
    Case("split-sizes-getitem", lambda: Lambda(lambda x: torch.split(x, [1, 2], dim=1)[1] * 2.0), (3, 2, 2),
         IN3_MEAN, IN3_STD),
    Case("chunk-positions-per-unit", lambda: Lambda(lambda x: x.chunk(2, dim=2)[1]), (2, 5, 3), IN2_MEAN, IN2_STD,
         spatial=True),
    Case("unbind", lambda: Lambda(lambda x: x.unbind(1)[2]), (3, 4), IN3_MEAN, IN3_STD),
    Case("transpose-per-unit", lambda: Lambda(lambda x: x.transpose(1, 3)), (2, 3, 4), IN2_MEAN, IN2_STD,
         spatial=True),
    Case("channel-shuffle", lambda: Lambda(lambda x: x.view(x.size(0), 2, 2, 3, 3).transpose(1, 2).reshape(
        x.size(0), 4, 3, 3)), (4, 3, 3), IN4_MEAN, IN4_STD),
    Case("layernorm2d-channels-last", seeded(_layer_norm_2d), (16, 3, 3), SIXTEEN_MEAN, SIXTEEN_STD, **NORM_TOLERANCE),
    Case("expand-as", lambda: Lambda(lambda x: torch.cat([x[:, :, :1].expand_as(x), x[:, :, 1:2].expand(-1, -1, 2, -1)],
                                                         dim=2)), (2, 3, 4), IN2_MEAN, IN2_STD),
    Case("pad-constant-per-unit", lambda: Lambda(lambda x: F.pad(x, (1, 2, 0, 1), value=1.5)), (2, 3, 3),
         IN2_MEAN, IN2_STD, spatial=True),
    Case("pad-constant-channels", lambda: nn.ZeroPad2d(1), (2, 3, 3), IN2_MEAN, IN2_STD),
    Case("pad-reflect-per-unit", lambda: Lambda(lambda x: F.pad(x, (2, 1, 1, 2), mode="reflect")), (2, 4, 4),
         IN2_MEAN, IN2_STD, spatial=True),
    Case("pad-replicate", lambda: nn.ReplicationPad2d(1), (2, 3, 3), IN2_MEAN, IN2_STD),
    Case("interpolate-nearest", lambda: nn.Upsample(scale_factor=2), (2, 3, 3), IN2_MEAN, IN2_STD),
    Case("interpolate-bilinear-per-unit", lambda: Lambda(lambda x: F.interpolate(x, size=(5, 7), mode="bilinear")),
         (2, 3, 4), IN2_MEAN, IN2_STD, spatial=True),
    Case("interpolate-bilinear-align-corners-per-unit",
         lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), (2, 3, 3), IN2_MEAN, IN2_STD,
         spatial=True),
    Case("interpolate-bicubic-per-unit", lambda: Lambda(lambda x: F.interpolate(x, scale_factor=2, mode="bicubic")),
         (2, 3, 3), IN2_MEAN, IN2_STD, spatial=True),
    Case("stack", lambda: Lambda(lambda x: torch.stack([x, x.relu()], dim=2)), (2, 3), IN2_MEAN, IN2_STD),
    Case("unfold-per-unit", lambda: nn.Unfold(2, padding=1, stride=2), (2, 4, 4), IN2_MEAN, IN2_STD, spatial=True),
    Case("fold-per-unit", lambda: Lambda(lambda x: F.fold(x, (4, 4), 3, padding=1)), (18, 16),
         [0.5] * 18, [1.0 + 0.1 * i for i in range(18)], spatial=True),
    Case("matmul-constant", seeded(lambda: Lambda(lambda x, lin: x @ lin.weight.T, nn.Linear(4, 3))), (2, 4),
         IN2_MEAN, IN2_STD),
    Case("matmul-independent-activations",
         lambda: Lambda(lambda x: x[:, :2] @ x[:, 2:].transpose(-2, -1)), (4, 3, 3), IN4_MEAN, IN4_STD),
    Case("bmm-independent-activations", lambda: Lambda(lambda x: torch.bmm(x[:, 0], x[:, 1]).unsqueeze(1)),
         (2, 3, 3), IN2_MEAN, IN2_STD),
    Case("drop-path-timm-train", _timm_drop_path, (6,), train=True),
    Case("stochastic-depth-torchvision-train", _torchvision_stochastic_depth, (6,), train=True),
    Case("layer-norm-features", seeded(lambda: nn.LayerNorm(16)), (16,), SIXTEEN_MEAN, SIXTEEN_STD,
         **NORM_TOLERANCE),
    Case("group-norm", seeded(lambda: nn.GroupNorm(4, 16)), (16, 3, 3), SIXTEEN_MEAN, SIXTEEN_STD, **NORM_TOLERANCE),
    Case("instance-norm", lambda: nn.InstanceNorm2d(2), (2, 6, 6), IN2_MEAN, IN2_STD, **NORM_TOLERANCE),
    Case("instance-norm-running", batch_norm_eval(lambda c: nn.InstanceNorm2d(c, affine=True,
                                                                             track_running_stats=True), 2),
         (2, 3, 3), IN2_MEAN, IN2_STD),
]
