"""MobileNetV3-Large (Howard et al., "Searching for MobileNetV3", ICCV 2019, Table 1) with its
last stage dilated (output stride 16), and DeepLabV3's ASPP (Chen et al. 2017/2018), written
here so that serving does not import torchvision: its ``ops`` package imports ``torch._dynamo``,
about 75 MB of every worker's memory and a second of its start. The modules are named as
torchvision names them (``features.N.block.M``, ``fc1`` / ``fc2``, ``convs`` / ``project``), so
checkpoints trained with torchvision's versions load unchanged (tested against torchvision in
``tests/test_network.py``). The ResNet backbones still come from torchvision, imported only when
one is asked for.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def _divisible(v: float, divisor: int = 8) -> int:
    """``v`` rounded to a multiple of ``divisor``, never below 90% of ``v`` (MobileNet's rule)."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


class ConvBN(nn.Sequential):
    """conv (no bias) -> BatchNorm -> activation (none when ``act`` is None); "same" padding."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU, eps: float = 1e-3, momentum: float = 0.01):
        layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2 * dilation, dilation, groups, bias=False),
                  nn.BatchNorm2d(cout, eps=eps, momentum=momentum)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Channel attention (Hu et al. 2018): the input scaled per channel by
    hardsigmoid(fc2(relu(fc1(mean over pixels))))."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class Bneck(NamedTuple):
    """One row of MobileNetV3-Large's Table 1."""
    cin: int
    kernel: int
    expanded: int
    cout: int
    se: bool
    hardswish: bool
    stride: int
    dilation: int


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: 1x1 expand, depthwise conv (stride 1 where dilated), optional
    squeeze-excite, 1x1 project; the input added back when the shape is kept."""

    def __init__(self, c: Bneck):
        super().__init__()
        act = nn.Hardswish if c.hardswish else nn.ReLU
        layers: list[nn.Module] = []
        if c.expanded != c.cin:
            layers.append(ConvBN(c.cin, c.expanded, 1, act=act))
        layers.append(ConvBN(c.expanded, c.expanded, c.kernel, 1 if c.dilation > 1 else c.stride, c.dilation,
                             groups=c.expanded, act=act))
        if c.se:
            layers.append(SqueezeExcite(c.expanded, _divisible(c.expanded // 4)))
        layers.append(ConvBN(c.expanded, c.cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = c.stride == 1 and c.cin == c.cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.residual else y


def mobilenet_v3_large_features(dilated: bool = True) -> nn.Sequential:
    """MobileNetV3-Large's feature layers (17: stem, 15 bottlenecks, the 960-channel 1x1), the
    last stage dilated instead of strided when ``dilated`` (output stride 16). Weights as
    torchvision initialises them (He normal, fan out; BatchNorm 1 / 0)."""
    d = 2 if dilated else 1
    table = [  # cin, kernel, expanded, cout, SE, hardswish, stride, dilation
        (16, 3, 16, 16, False, False, 1, 1), (16, 3, 64, 24, False, False, 2, 1), (24, 3, 72, 24, False, False, 1, 1),
        (24, 5, 72, 40, True, False, 2, 1), (40, 5, 120, 40, True, False, 1, 1), (40, 5, 120, 40, True, False, 1, 1),
        (40, 3, 240, 80, False, True, 2, 1), (80, 3, 200, 80, False, True, 1, 1), (80, 3, 184, 80, False, True, 1, 1),
        (80, 3, 184, 80, False, True, 1, 1), (80, 3, 480, 112, True, True, 1, 1), (112, 3, 672, 112, True, True, 1, 1),
        (112, 5, 672, 160, True, True, 2, d), (160, 5, 960, 160, True, True, 1, d), (160, 5, 960, 160, True, True, 1, d),
    ]
    layers: list[nn.Module] = [ConvBN(3, 16, 3, 2, act=nn.Hardswish)]
    layers += [InvertedResidual(Bneck(*row)) for row in table]
    layers.append(ConvBN(160, 960, 1, act=nn.Hardswish))
    features = nn.Sequential(*layers)
    # torchvision also builds an ImageNet classifier the encoder drops; drawing its random numbers
    # in the same order keeps a seeded network (tests, training from scratch) torchvision's to the bit
    head = (nn.Linear(960, 1280), nn.Linear(1280, 1000))
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in head:
        nn.init.normal_(m.weight, 0, 0.01)
    return features


class _ASPPPooling(nn.Sequential):
    """The ASPP's image-level branch: global mean -> 1x1 conv -> BN -> ReLU, spread back over
    the map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for m in self:
            y = m(y)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=dilation if kernel == 3 else 0, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU()]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3): a 1x1 branch, one dilated 3x3 branch per
    rate, an image-level branch, concatenated and projected to ``out_channels`` (dropout 0.5)."""

    def __init__(self, in_channels: int, rates, out_channels: int = 256):
        super().__init__()
        branches = [nn.Sequential(*_conv_bn_relu(in_channels, out_channels, 1))]
        branches += [nn.Sequential(*_conv_bn_relu(in_channels, out_channels, 3, r)) for r in rates]
        branches.append(_ASPPPooling(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_channels, out_channels, 1)))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(*_conv_bn_relu(len(branches) * out_channels, out_channels, 1), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))
