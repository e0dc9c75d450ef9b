"""ResNets (He et al., CVPR 2016) from torchvision's blocks: ResNet-18 for 32x32 CIFAR images, and
ResNet-50 / ResNet-18 for ImageNet (``resnet50``, ``resnet18``; see the ImageNet section below).

The CIFAR variant replaces the ImageNet stem (7x7 stride-2 convolution and max-pool) by one 3x3
stride-1 convolution, as in the SlowMo paper's CIFAR-10 experiments. ``width`` multiplies every
stage's channel count (64-128-256-512 at width 1), so CPU runs can train a narrower net.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck


def init_resnet_(model: nn.Module) -> None:
    """He (fan-out) init for convolutions, identity BatchNorm, then zero the last BN gamma of every
    residual branch so each block starts as the identity (Goyal et al., 2017), which keeps the
    large-batch warm-up stable."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
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
        init_resnet_(self)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def cifar_resnet18(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    return CifarResNet((2, 2, 2, 2), num_classes=num_classes, width=width)


# --- ImageNet ResNets ------------------------------------------------------------------------------
#
# torchvision's ``resnet50(zero_init_residual=True)`` fixes the channel counts (its
# ``width_per_group`` only widens the 3x3 convolutions inside a bottleneck), so the ImageNet ResNets
# are assembled here from torchvision's public Bottleneck/BasicBlock with every channel count
# multiplied by ``width``. Module names follow torchvision's (conv1, bn1, layer1..4, fc): at width 1
# the state dict has exactly the keys and shapes of ``torchvision.models.resnet50()`` (checked in
# tests/test_imagenet.py), so torchvision checkpoints load into it.


class ImageNetResNet(nn.Module):
    """ResNet for 224x224 inputs (He et al., CVPR 2016): 7x7 stride-2 stem, 3x3 max-pool, four
    stages, global average pool, linear classifier; torchvision's ResNet v1.5 blocks (stride in the
    3x3 convolution). The last BatchNorm gamma of each residual branch starts at zero, so each block
    starts as the identity (Goyal et al., 2017, Sec. 5.1)."""

    def __init__(self, block, blocks, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        if width <= 0:
            raise ValueError(f"model.width must be > 0, got {width}")
        planes = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        self.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._layer(block, planes[0], blocks[0], stride=1)
        self.layer2 = self._layer(block, planes[1], blocks[1], stride=2)
        self.layer3 = self._layer(block, planes[2], blocks[2], stride=2)
        self.layer4 = self._layer(block, planes[3], blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        self._init_weights()

    def _layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        layers = [block(self.inplanes, planes, stride=stride, downsample=downsample)]
        self.inplanes = out
        layers += [block(out, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        init_resnet_(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet50(num_classes: int = 1000, width: float = 1.0) -> ImageNetResNet:
    """ResNet-50 (3-4-6-3 bottlenecks, 25.6M parameters at width 1), the SlowMo paper's ImageNet model."""
    return ImageNetResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, width=width)


def resnet18(num_classes: int = 1000, width: float = 1.0) -> ImageNetResNet:
    """ResNet-18 with the ImageNet stem (2-2-2-2 basic blocks), a cheaper stand-in for quick runs."""
    return ImageNetResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, width=width)
