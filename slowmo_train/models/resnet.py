"""ResNet-18 for 32x32 images (He et al., CVPR 2016), built from torchvision's BasicBlock.

The CIFAR variant replaces the ImageNet stem (7x7 stride-2 convolution and max-pool) by one 3x3
stride-1 convolution, as in the SlowMo paper's CIFAR-10 experiments. ``width`` multiplies every
stage's channel count (64-128-256-512 at width 1), so CPU runs can train a narrower net.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes),
        )
    layers = [BasicBlock(inplanes, planes, stride=stride, downsample=downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    def __init__(self, blocks=(2, 2, 2, 2), num_classes: int = 10, width: float = 1.0):
        super().__init__()
        if width <= 0:
            raise ValueError(f"model.width must be > 0, got {width}")
        channels = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        )
        stages, inplanes = [], channels[0]
        for i, (planes, n) in enumerate(zip(channels, blocks)):
            stages.append(_stage(inplanes, planes, n, stride=1 if i == 0 else 2))
            inplanes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each residual branch so every block starts as the identity
        # (Goyal et al., 2017), which makes large-batch warm-up stable.
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def cifar_resnet18(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    return CifarResNet((2, 2, 2, 2), num_classes=num_classes, width=width)
