"""Random crops and flips of a batch of images in tensor operations, drawn from a given ``torch.Generator``."""

import math

import torch
import torch.nn.functional as F

__all__ = ["ASPECT_RATIOS", "random_resized_crops"]

ASPECT_RATIOS = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default


def random_resized_crops(images: torch.Tensor, generator: torch.Generator, min_scale: float) -> torch.Tensor:
    """Each image cropped to a random box, resized back to its size and flipped left-right with probability 1/2:
    torchvision's ``RandomResizedCrop(size, scale=(min_scale, 1))`` then ``RandomHorizontalFlip()``, per image.

    The box's area share s ~ U(min_scale, 1) and its aspect ratio r (log-uniform in 3/4..4/3) give its width and
    height as shares of the image's, sqrt(s r H / W) and sqrt(s W / (r H)), each at most 1; its position is uniform
    over the places where it fits. Unlike torchvision, a box larger than the image is shrunk to fit instead of drawn
    again (up to ten times, then a centre crop), positions are continuous rather than whole pixels, and the box is
    resampled bilinearly (``grid_sample``; it is never smaller than the image, so no antialiasing is needed). One
    draw of five numbers per image from ``generator``; no host synchronisation, so a CUDA graph can hold it.

    >>> flat = torch.full((2, 3, 8, 8), 0.5)
    >>> torch.allclose(random_resized_crops(flat, torch.Generator().manual_seed(0), 0.5), flat)
    True
    """
    n, _, height, width = images.shape
    draws = torch.rand(n, 5, generator=generator, device=images.device, dtype=images.dtype)
    area = min_scale + (1 - min_scale) * draws[:, 0]
    low, high = math.log(ASPECT_RATIOS[0]), math.log(ASPECT_RATIOS[1])
    aspect = torch.exp(low + (high - low) * draws[:, 1])
    box_width = torch.sqrt(area * aspect * height / width).clamp(max=1)
    box_height = torch.sqrt(area / aspect * width / height).clamp(max=1)
    # affine_grid's coordinates run from -1 to 1 over the image: a box of share b has its centre within 1 - b of 0.
    centre_x = (2 * draws[:, 2] - 1) * (1 - box_width)
    centre_y = (2 * draws[:, 3] - 1) * (1 - box_height)
    flip = 1 - 2 * (draws[:, 4] < 0.5).to(images.dtype)  # -1: mirrored
    zero = torch.zeros_like(area)
    theta = torch.stack([torch.stack([box_width * flip, zero, centre_x], 1),
                         torch.stack([zero, box_height, centre_y], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
