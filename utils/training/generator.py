"""Conditional generators of synthetic images (GDFQ's architecture)."""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConditionalBatchNorm2d", "ConditionalBNGenerator", "LabelEmbeddingGenerator", "build_generator",
           "upsample_conv3x3"]


def _fold_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3 taps of a 3x3 kernel along ``dim`` folded onto a 2x-nearest-upsampled input: (even, odd) outputs.

    An even output pixel 2i sees the upsampled pixels 2i-1, 2i, 2i+1 = original i-1, i, i: taps (w0, w1 + w2) on
    original (i-1, i). An odd one, 2i+1, sees 2i, 2i+1, 2i+2 = i, i, i+1: taps (w0 + w1, w2) on (i, i+1).
    """
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


class _InterleavePhases(torch.autograd.Function):
    """[N, 2, 2, C, H + 1, W + 1] phases to [N, C, 2H, 2W]: pixel (2i + a, 2j + b) = phase (a, b) at (i + a, j + b).

    Written out because autograd's own version (slices, then stack) fills a zero tensor of the full input
    for each of the four slices in the backward pass; this one fills one.
    """

    @staticmethod
    def forward(ctx, phases, h: int, w: int):
        n, channels = phases.shape[0], phases.shape[3]
        out = phases.new_empty(n, channels, h, 2, w, 2)
        for a in (0, 1):
            for b in (0, 1):
                out[:, :, :, a, :, b] = phases[:, a, b, :, a:a + h, b:b + w]
        ctx.phases_shape = phases.shape
        return out.view(n, channels, 2 * h, 2 * w)

    @staticmethod
    def backward(ctx, grad):
        n, _, _, channels, h, w = ctx.phases_shape
        h, w = h - 1, w - 1
        grad = grad.reshape(n, channels, h, 2, w, 2)
        grad_phases = grad.new_zeros(ctx.phases_shape)
        for a in (0, 1):
            for b in (0, 1):
                grad_phases[:, a, b, :, a:a + h, b:b + w] = grad[:, :, :, a, :, b]
        return grad_phases, None, None


def upsample_conv3x3(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2))`` for a 3x3, stride-1, padding-1 conv, with 2.25x fewer multiply-adds.

    Nearest upsampling repeats every pixel in a 2x2 block, so each of the four output phases (row and column
    parity) is a 2x2 convolution of ``x`` itself with summed weights (:func:`_fold_taps`). The four phases run
    as one convolution with 4x the output channels; the upsampled map is never built. The same function up to
    float rounding (about 1e-7 relative), with gradients for ``x``, the weight and the bias.
    """
    n, _, h, w = x.shape
    kernels = [k for rows in _fold_taps(conv.weight, 2) for k in _fold_taps(rows, 3)]  # phases (0,0) (0,1) (1,0) (1,1)
    bias = None if conv.bias is None else conv.bias.repeat(4)
    phases = F.conv2d(x, torch.cat(kernels), bias, padding=1)  # [N, 4C, H + 1, W + 1]
    return _InterleavePhases.apply(phases.reshape(n, 2, 2, conv.out_channels, h + 1, w + 1), h, w)


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
        # conv(upsample(x)) is computed by upsample_conv3x3: the same function without the redundant work.
        x = self.l1(self.embed(z, labels)).view(z.shape[0], 128, self.init_size, self.init_size)
        x = upsample_conv3x3(self.norm(0, x, labels), self.conv1)
        x = upsample_conv3x3(F.leaky_relu(self.norm(1, x, labels), 0.2), self.conv2)
        x = F.leaky_relu(self.norm(2, x, labels), 0.2)
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


NOISE_STREAM = 0x6E6F6973  # mixed into the noise generator's seed


def noise_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one process's training noise, on ``device``, seeded from the run's seed and the rank."""
    generator = torch.Generator(device=device)
    # Distinct from the global stream seeded with ``seed`` (which initialises the generator network).
    generator.manual_seed(int(np.random.SeedSequence([seed, rank, NOISE_STREAM]).generate_state(1, np.uint64)[0]))
    return generator
