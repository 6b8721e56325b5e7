"""Models a user might write, referenced in tests as ``tests.e2e.user_models:NAME``."""

import torch.nn as nn


def _features(activation: type[nn.Module], batch_norm: bool = True) -> list[nn.Module]:
    layers = []
    for c_in, c_out, stride in ((3, 8, 1), (8, 16, 2)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not batch_norm)]
        layers += [nn.BatchNorm2d(c_out)] if batch_norm else []
        layers += [activation()]
    return layers


def tiny_net(num_classes: int = 10) -> nn.Module:
    """conv-BN-ReLU twice, global average pooling, a linear classifier."""
    return nn.Sequential(*_features(nn.ReLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


def tiny_hardswish_net(num_classes: int = 10) -> nn.Module:
    """tiny_net with Hardswish activations, as in MobileNetV3."""
    return nn.Sequential(*_features(nn.Hardswish), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, num_classes))


def tiny_net_without_batchnorm(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(*_features(nn.ReLU, batch_norm=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, num_classes))


class MaskedConv(nn.Conv2d):
    """A convolution subclass with its own forward (as pytorchcv's XConv2d, Conv2d1bit, OctConv)."""

    def forward(self, x):
        return super().forward(x).clamp(min=0)


def not_a_model():
    return "a string"


class _ReusedRelu(nn.Module):
    """One ReLU module called at two places, as in torchvision's ResNet blocks."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.out_relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.conv1(x))
        return self.out_relu(self.relu(self.conv2(x)) + x)


def reused_relu_net() -> nn.Module:
    return _ReusedRelu()



def tiny_mlp(num_classes: int = 10) -> nn.Module:
    """No convolution: flatten, linear, BatchNorm1d, ReLU, linear."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, num_classes))
