"""Option-A ResNet-20 (He et al. 2016, section 4.2), in the key layout of akamaster/pytorch_resnet_cifar10."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import download_to_cache, register_model

__all__ = ["ResNet20A", "resnet20a_cifar10"]

RESNET20A_URL = ("https://raw.githubusercontent.com/akamaster/pytorch_resnet_cifar10/master/"
                 "pretrained_models/resnet20-12fca82f.th")
RESNET20A_SHA256_PREFIX = "12fca82f"


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels, no parameters."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlockA(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _PadShortcut(planes // 4) if stride != 1 or in_planes != planes else nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20A(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        for index, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for block in range(3):
                stride = 2 if block == 0 and index > 1 else 1
                blocks.append(_BasicBlockA(in_planes, planes, stride))
                in_planes = planes
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.pool(x), 1))


def _fetch_resnet20a() -> str:
    return download_to_cache(RESNET20A_URL, hash_prefix=RESNET20A_SHA256_PREFIX)


@register_model("resnet20a_cifar10", "cifar10", 10, 32, _fetch_resnet20a)
def resnet20a_cifar10() -> nn.Module:
    """The option-A ResNet-20 for CIFAR-10, with the key layout of akamaster/pytorch_resnet_cifar10's weights."""
    return ResNet20A(num_classes=10)

