"""Conditional generators of synthetic images (GDFQ's architecture)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConditionalBatchNorm2d", "ConditionalBNGenerator", "LabelEmbeddingGenerator", "build_generator"]


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose affine (weight, bias) pair is chosen by the class label of each sample."""

    def __init__(self, num_classes: int, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, affine=False)
        self.weight = nn.Embedding(num_classes, num_features)
        self.bias = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.weight.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x, labels):
        out = self.bn(x)
        return out * self.weight(labels)[:, :, None, None] + self.bias(labels)[:, :, None, None]


class _GeneratorBase(nn.Module):
    """Linear(latent -> 128 x s/4 x s/4), then two (upsample x2, conv, BN, LeakyReLU) stages, then
    conv to RGB, tanh and an affine-free BatchNorm. Subclasses choose how the label conditions it."""

    def __init__(self, num_classes: int, latent_dim: int, img_size: int, channels: int):
        super().__init__()
        self.init_size = img_size // 4
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size**2)
        self.conv1 = nn.Conv2d(128, 128, 3, padding=1)
        self.conv2 = nn.Conv2d(128, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def norm(self, index: int, x, labels):
        raise NotImplementedError

    def embed(self, z, labels):
        return z

    def forward(self, z, labels):
        x = self.l1(self.embed(z, labels)).view(z.shape[0], 128, self.init_size, self.init_size)
        x = F.interpolate(self.norm(0, x, labels), scale_factor=2)
        x = F.interpolate(F.leaky_relu(self.norm(1, self.conv1(x), labels), 0.2), scale_factor=2)
        x = F.leaky_relu(self.norm(2, self.conv2(x), labels), 0.2)
        return self.out_bn(torch.tanh(self.conv3(x)))


class LabelEmbeddingGenerator(_GeneratorBase):
    """CIFAR generator: the input is label_embedding(y) * z; plain BatchNorm (eps 0.8 as published)."""

    def __init__(self, num_classes: int, latent_dim: int, img_size: int, channels: int = 3):
        super().__init__(num_classes, latent_dim, img_size, channels)
        self.label_emb = nn.Embedding(num_classes, latent_dim)
        self.bns = nn.ModuleList([nn.BatchNorm2d(128), nn.BatchNorm2d(128, eps=0.8), nn.BatchNorm2d(64, eps=0.8)])

    def embed(self, z, labels):
        return self.label_emb(labels) * z

    def norm(self, index, x, labels):
        return self.bns[index](x)


class ConditionalBNGenerator(_GeneratorBase):
    """ImageNet generator: class-conditional BatchNorm (one affine pair per class) instead of an embedding."""

    def __init__(self, num_classes: int, latent_dim: int, img_size: int, channels: int = 3):
        super().__init__(num_classes, latent_dim, img_size, channels)
        self.bns = nn.ModuleList([ConditionalBatchNorm2d(num_classes, 128),
                                  ConditionalBatchNorm2d(num_classes, 128, eps=0.8),
                                  ConditionalBatchNorm2d(num_classes, 64, eps=0.8)])

    def norm(self, index, x, labels):
        return self.bns[index](x, labels)


def build_generator(options) -> nn.Module:
    kind = {"label_embedding": LabelEmbeddingGenerator, "conditional_bn": ConditionalBNGenerator}
    return kind[options.generator_kind](options.nClasses, options.latent_dim, options.img_size, options.channels)
