"""SynQ (Kim, Kim and Kang, "SynQ: Accurate Zero-shot Quantization by Synthesis-aware Fine-tuning", ICLR 2025):
a low-pass filter on the synthetic images, Grad-CAM alignment and cross-entropy on the easy samples only."""

import torch
import torch.nn.functional as F

from .layers import last_spatial_conv
from .registry import StudentLoss, register_input_filter, register_student_loss

__all__ = ["CAM_EPS", "LOWPASS_REFERENCE_SIZE", "GradCamAlignment", "grad_cam", "gaussian_lowpass", "lowpass",
           "reliable_ce", "upsample_bilinear"]

LOWPASS_REFERENCE_SIZE = 224  # lowpass_d0 is the cut-off radius at this image size (SynQ's ImageNet code: 80)
CAM_EPS = 1e-6  # floor of a map's range in its min-max normalisation


def gaussian_lowpass(images: torch.Tensor, d0: float) -> torch.Tensor:
    """Each channel times G = exp(-D^2 / (2 * d0^2)) in the frequency domain, D the distance of a frequency from
    zero in frequency-index units (the centre of the shifted spectrum, as SynQ's code measures it).

    A constant image is kept; the highest frequency of an H x H image, D^2 = 2 (H / 2)^2, is scaled by
    exp(-H^2 / (4 d0^2)).

    >>> x = torch.ones(1, 1, 4, 4)
    >>> torch.allclose(gaussian_lowpass(x, 1.0), x)
    True
    """
    height, width = images.shape[-2:]
    ky = torch.fft.fftfreq(height, d=1.0 / height, device=images.device)
    kx = torch.fft.rfftfreq(width, d=1.0 / width, device=images.device)
    gain = torch.exp(-(ky[:, None].square() + kx[None, :].square()) / (2 * d0**2))
    # G is even in each frequency, so the half spectrum of rfft2 holds all it needs and the result is real.
    return torch.fft.irfft2(torch.fft.rfft2(images.float()) * gain, s=(height, width)).to(images.dtype)


@register_input_filter("lowpass")
def lowpass(images: torch.Tensor, options) -> torch.Tensor:
    """SynQ's low-pass filter: x -> F^-1(F(x) * exp(-D^2 / (2 * D0^2))) per image and channel
    (:func:`gaussian_lowpass`), D0 = ``lowpass_d0`` * image size / 224 (SynQ's code: D0 = 80 at 224 px, so
    11.4 at 32 px).

    As in SynQ's code, both networks read the filtered images for the student's loss: the teacher's targets come
    from them too. The generator's own losses (BN statistics, one-hot, marginal) keep the unfiltered images, so
    that its training is that of GranQ; the filtered batch takes one more forward pass of each network.
    """
    size = min(images.shape[-2:])
    return gaussian_lowpass(images, options.lowpass_d0 * size / LOWPASS_REFERENCE_SIZE)


def _bilinear_weights(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """The [size_out, size_in] matrix of 1-d linear interpolation as ``F.interpolate`` computes it without aligned
    corners: output i reads the input at x = max((i + 0.5) * size_in / size_out - 0.5, 0), weights 1 - (x - floor x)
    and x - floor x on floor x and the next input (the same one at the last)."""
    x = ((torch.arange(size_out, device=like.device, dtype=like.dtype) + 0.5) * (size_in / size_out) - 0.5).clamp(min=0)
    low = x.floor().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    frac = (x - low)[:, None]
    inputs = torch.arange(size_in, device=like.device, dtype=like.dtype)[None, :]
    return (1 - frac) * (inputs == low[:, None]) + frac * (inputs == high[:, None])


def upsample_bilinear(maps: torch.Tensor, size) -> torch.Tensor:
    """``F.interpolate(maps, size, mode="bilinear", align_corners=False)`` for [N, C, U, V] maps.

    Under ``torch.use_deterministic_algorithms(True)`` it is computed as two matrix products with the interpolation
    weights (:func:`_bilinear_weights`): the backward pass of ``interpolate`` has no deterministic CUDA kernel and
    raises there, that of a matrix product does not. The values agree with ``interpolate`` up to float rounding
    (about 1e-7); without deterministic algorithms ``interpolate`` itself runs, so those runs keep its values.

    >>> maps = torch.rand(2, 1, 8, 8)
    >>> reference = F.interpolate(maps, size=(32, 32), mode="bilinear", align_corners=False)
    >>> torch.use_deterministic_algorithms(True)
    >>> torch.allclose(upsample_bilinear(maps, (32, 32)), reference, atol=1e-6)
    True
    >>> torch.use_deterministic_algorithms(False)
    """
    if not torch.are_deterministic_algorithms_enabled():
        return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    rows = _bilinear_weights(maps.shape[-2], size[0], maps)
    columns = _bilinear_weights(maps.shape[-1], size[1], maps)
    return rows @ maps @ columns.T


def grad_cam(features: torch.Tensor, logits: torch.Tensor, size) -> torch.Tensor:
    """Grad-CAM of each sample's top-1 class, min-max normalised to [0, 1]: [N, K, U, V] -> [N, 1, *size].

    alpha_k = max(mean_uv d y_c / d A_k, 0), M = relu(sum_k alpha_k A_k) upsampled bilinearly to ``size``
    (:func:`upsample_bilinear`),
    M = (M - min M) / max(max M - min M, CAM_EPS). The weights alpha are constants (no gradient flows through
    them), as in SynQ's code, which clamps them at 1e-10 from below. A flat map becomes 0, never NaN.
    """
    score = logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
    gradient, = torch.autograd.grad(score, features, retain_graph=True)
    weights = gradient.float().mean(dim=(2, 3), keepdim=True).clamp(min=0)
    cam = F.relu((weights * features.float()).sum(dim=1, keepdim=True))
    cam = upsample_bilinear(cam, size)
    low = cam.amin(dim=(2, 3), keepdim=True)
    high = cam.amax(dim=(2, 3), keepdim=True)
    return (cam - low) / (high - low).clamp(min=CAM_EPS)


@register_student_loss("cam")
class GradCamAlignment(StudentLoss):
    """SynQ's class activation map alignment: L = w * mean_(n,pixels) (M_teacher - M_student)^2, w = ``cam_weight``
    (SynQ's code: 200; its ImageNet 3-bit script: 50, set in ImageNet/imagenet_common.hocon).

    M is the Grad-CAM of :func:`grad_cam` at the last convolution with a spatial output (as SynQ's code, which
    takes the last Conv2d), for each network's own top-1 class (SynQ's code), upsampled to the input size. The
    teacher's map is a constant target; the student's gets its gradient through its activations.

    Guard against NaN/Inf (SynQ's users report them with ResNet-50 and MobileNetV2 at W4A4): the maps are computed
    in float32 and normalised with a floor CAM_EPS on their range, so each lies in [0, 1] and the term in [0, w]
    whenever the activations are finite. A non-finite activation or gradient still makes the term non-finite, and
    the run stops naming ``cam`` (utils.training.losses.check_finite).
    """

    def layers(self, model, image):
        return [last_spatial_conv(model, image)]

    def __call__(self, batch):
        layer, = self.layer_names
        size = (self.options.img_size, self.options.img_size)
        with torch.enable_grad():
            teacher = grad_cam(batch.teacher_features[layer], batch.teacher_logits, size).detach()
            student = grad_cam(batch.student_features[layer], batch.student_logits, size)
        return self.options.cam_weight * F.mse_loss(student, teacher)


@register_student_loss("reliable_ce")
def reliable_ce(batch, options) -> torch.Tensor:
    """SynQ's cross-entropy on easy samples: L = w * (1/N) * sum_n [d_n < tau] * CE(s_n, y_n), with
    d_n = 1 - softmax(t_n)[y_n] the sample's difficulty for the teacher, tau = ``reliable_ce_tau`` (SynQ: 0.5, and
    0.7 on CIFAR-10, set in CIFAR/cifar10_resnet20.hocon) and w = ``reliable_ce_weight`` (SynQ's scripts: 0.5; its
    code's default 5). Hard samples get no hard label, only the other terms (soft labels).

    y is the class the generator was asked for, as SynQ uses the label its synthetic sample was made for; for
    tau <= 0.5 an easy sample's y is also the teacher's top-1 class. The mean runs over the whole batch (SynQ's code
    replaces the hard samples by a constant-loss dummy and averages over all), so the term shrinks when few
    samples are easy.
    """
    teacher = batch.teacher_logits.detach()
    difficulty = 1 - F.softmax(teacher, dim=1).gather(1, batch.labels[:, None]).squeeze(1)
    easy = (difficulty < options.reliable_ce_tau).to(batch.student_logits.dtype)
    ce = F.cross_entropy(batch.student_logits, batch.labels, reduction="none")
    return options.reliable_ce_weight * (easy * ce).mean()
