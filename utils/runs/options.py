"""The run's options: one typed dataclass with the official keys' spellings, its defaults, and the check of every
value (:meth:`Options.validate`). :mod:`.config` reads them from hocon files, ``--set`` overrides and recipes."""

import dataclasses
import os
from dataclasses import dataclass, field

from pyhocon import ConfigFactory, HOCONConverter

from quantization_utils import ACT_TYPES, DEFAULT_ACT_TYPES, QUANT_IMPLS, StudentSpec, act_quantizer_names
from quantization_utils.functional import MAX_BITS, MIN_BITS, WEIGHT_GRANULARITIES

from ..data.eval_cache import EVAL_CACHE_MODES
from ..models import get_model_spec
from ..system.errors import ConfigError, UserError
from ..training.graphs import CUDA_GRAPH_MODES
from ..training.losses import GENERATOR_LOSSES, input_filter_names, student_loss_names
from ..training.optim import LR_POLICIES
from ..training.pools import check_pool_options

__all__ = ["DATASET_CLASSES", "GENERATORS", "KL_REDUCTIONS", "LEGACY_KEYS", "OPTIMIZERS", "Options"]

DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
GENERATORS = ("label_embedding", "conditional_bn")
NETWORKS = ("S", "G")  # the suffixes of the student's and the generator's optimiser keys
OPTIMIZERS = ("SGD", "Adam")
KL_REDUCTIONS = ("batchmean", "mean")  # torch's KLDivLoss reductions that the kl term offers

# Keys of the official configs that have no effect here; accepted so published configs still load.
LEGACY_KEYS = {
    "nGPU": "use torchrun for several GPUs",
    "visible_devices": "set CUDA_VISIBLE_DEVICES instead",
    "fd_temperature": "the feature-distillation loss it belongs to is never used by the official code; the "
                      "attention term of student_losses reads attention_temperature",
}


@dataclass
class Options:
    # General
    save_path: str = "./save_cifar10/"
    dataPath: str = ""
    dataset: str = "cifar10"
    network: str = "resnet20_cifar10"
    GPU: int = 0  # CUDA device index when CUDA is available
    nGPU: int = 1
    visible_devices: str = ""
    nThreads: int = 8  # data loader workers for evaluation
    deterministic: bool = False  # true: the same --id gives the same run on CUDA too, slower (utils/system/devices.py)
    cuda_graph: str = "off"  # off | auto | on: the training iteration replayed as a CUDA graph (training/graphs.py)
    experimentID: str = "cifar10_3bit"
    nClasses: int = 10
    # Student optimisation
    nEpochs: int = 200
    iters_per_epoch: int = 200
    batchSize: int = 16
    momentum: float = 0.9
    weightDecay: float = 1e-4
    opt_type: str = "SGD"
    warmup_epochs: int = 4
    # Learning-rate schedules of the student (_S) and the generator (_G); see schedule()
    lr_S: float = 1e-4
    lr_G: float = 1e-3
    lrPolicy_S: str = "multi_step"
    lrPolicy_G: str = "multi_step"
    step_S: list[int] = field(default_factory=lambda: [100, 200, 300])
    step_G: list[int] = field(default_factory=lambda: [100, 200, 300])
    decayRate_S: float = 0.1
    decayRate_G: float = 0.1
    # Quantization
    qw: int = 3
    qa: int = 3
    act_mode: str = "granq"
    weight_granularity: str = "kernel"
    act_range_epochs: int = 4  # layerwise / channel ranges are tracked during these first epochs, then frozen
    quant_impl: str = "auto"  # of the quantizers; auto: compiled where torch.compile works, else eager
    act_types: list[str] = field(default_factory=lambda: list(DEFAULT_ACT_TYPES))  # activations followed by a QuantAct
    # Generator losses
    generator_loss: str = "adadfq"  # adadfq (GranQ's: marginal + beta * onehot + gamma * bns) | gdfq (CE + gamma * bns)
    alpha_ds: float = 0.2
    alpha_as: float = 0.1
    lambda_l: float = 0.1
    lambda_u: float = 0.8
    beta: float = 1.0
    gamma: float = 1.0
    # Distillation
    temperature: float = 20.0
    alpha: float = 1.0  # the weight of the kl term (GDFQ: 1, SynQ: 20); GranQ's kd term does not read it
    fd_temperature: float = 8.0
    # The student's loss: registered terms (utils/losses, docs/addons.md) and the filter of its input images.
    # Defaults are the papers'; the dataset-specific ones are set in the CIFAR and ImageNet configs.
    recipe: str = ""  # a named set of the keys below, recipes/NAME.hocon (or a path); see load_options
    student_losses: list[str] = field(default_factory=lambda: ["kd"])
    student_input_filter: str = "none"  # none | lowpass
    lowpass_d0: float = 80.0  # SynQ: the low-pass cut-off radius at 224 px, scaled with the image size
    kl_reduction: str = "batchmean"  # kl: batchmean (HAST, SynQ) | mean, over batch and classes (GDFQ)
    ce_weight: float = 1.0  # GDFQ
    feature_alignment_weight: float = 4000.0  # SynQ (lam of its ImageNet config)
    attention_weight: float = 1000.0  # AKT
    attention_temperature: float = 8.0  # AKT
    cam_weight: float = 200.0  # SynQ (its ImageNet 3-bit script: 50)
    reliable_ce_weight: float = 0.5  # SynQ's scripts
    reliable_ce_tau: float = 0.5  # SynQ (0.7 on CIFAR-10)
    pseudo_label_upper: float = 0.5  # PLF, CIFAR (ImageNet: 0.4)
    pseudo_label_lower: float = 0.2  # PLF, CIFAR (ImageNet: 0.1)
    pseudo_label_beta: float = 0.3  # PLF, CIFAR (ImageNet: 0.5)
    pseudo_label_weight: float = 1.0
    # Generator
    generator: str = ""  # label_embedding | conditional_bn; empty: by dataset
    latent_dim: int = 100
    img_size: int = 32
    channels: int = 3
    b1: float = 0.5
    b2: float = 0.999
    # A pool of synthetic images instead of the generator (docs/methods.md); defaults: SynQ's released CIFAR settings
    image_source: str = "generator"  # generator | pool
    pool_size: int = 5120  # images (SynQ, HAST: 4 groups x 1,280)
    pool_batch: int = 256  # images optimised together
    pool_iters: int = 1000  # Adam steps per batch
    pool_lr: float = 0.5
    pool_min_lr: float = 1e-4  # ReduceLROnPlateau's floor ...
    pool_patience: int = 50  # ... and patience (ZeroQ: 100)
    pool_beta: float = 0.1  # SynQ's scripts (HAST's CIFAR scripts: 10)
    pool_gamma: float = 0.5  # SynQ's scripts (HAST's CIFAR scripts: 2)
    pool_bns_weight: float = 1.0  # SynQ with LBNS (its ImageNet data): 0.4
    pool_lbns_weight: float = 0.0  # SynQ's ImageNet data: 0.02
    pool_center_iters: int = 1500  # SynQ's class centres, made first where pool_lbns_weight > 0
    pool_aug_prob: float = 0.0  # chance per step of cropped and flipped images (SynQ's ImageNet data: 0.5) ...
    pool_aug_scale: float = 0.4  # ... keeping at least this share of the area
    pool_seed: int = 0  # the pool's own seed: every run seed reads the same pool
    pool_crop_scale: float = 0.5  # training on the pool: RandomResizedCrop(scale=(this, 1)) and flips
    pool_cache: str = "auto"  # auto | off | a directory (utils/training/pools/store.py)
    # Teacher and data
    teacher_weights: str = ""  # "": published weights; a path or URL; "random": tests only
    norm_mean: list[float] = field(default_factory=list)  # empty: the dataset's
    norm_std: list[float] = field(default_factory=list)
    test_batch_size: int = 200
    eval_cache: str = "auto"  # auto | off | a directory: the test set decoded once (utils/data/eval_cache.py)
    eval_every: int = 1  # evaluate every this many epochs, and always after the last
    eval_start_epoch: int = 0  # no evaluation before this (0-based) epoch, except after the last
    # Output
    log_interval: int = 50  # iterations between progress lines
    tensorboard: bool = False

    def validate(self) -> "Options":
        """Check every value once; raise ConfigError naming the key and the fix."""
        for key in ("qw", "qa"):
            value = getattr(self, key)
            if not MIN_BITS <= value <= MAX_BITS:
                raise ConfigError(f"{key} = {value} is out of range: bit-widths from {MIN_BITS} to {MAX_BITS} "
                                  f"are supported")
        _choice(self, "dataset", tuple(DATASET_CLASSES))
        _choice(self, "act_mode", act_quantizer_names())
        _choice(self, "weight_granularity", WEIGHT_GRANULARITIES)
        for net in NETWORKS:
            _choice(self, f"lrPolicy_{net}", LR_POLICIES)
        _choice(self, "opt_type", OPTIMIZERS)
        _choice(self, "quant_impl", QUANT_IMPLS)
        _choice(self, "cuda_graph", CUDA_GRAPH_MODES)
        _choice(self, "generator_loss", tuple(GENERATOR_LOSSES))
        if self.generator:
            _choice(self, "generator", GENERATORS)
        if not self.act_types:
            raise ConfigError(f"act_types = [] names no activation; choose from: {', '.join(ACT_TYPES)}")
        for kind in self.act_types:
            if kind not in ACT_TYPES:
                raise ConfigError(f"act_types = {self.act_types}: {kind!r} is not valid; choose from: "
                                  f"{', '.join(ACT_TYPES)}")
        try:
            spec = get_model_spec(self.network)
        except UserError as error:
            raise ConfigError(str(error)) from None
        if spec.dataset is not None and spec.dataset != self.dataset:
            raise ConfigError(f"network {self.network!r} is a {spec.dataset} model but dataset = {self.dataset!r}")
        if spec.num_classes is not None and self.nClasses != spec.num_classes:
            raise ConfigError(f"nClasses = {self.nClasses} disagrees with network {self.network!r} and dataset "
                              f"{self.dataset!r}, which have {spec.num_classes} classes")
        _at_least(self, "nClasses", 2)
        for key in ("nEpochs", "warmup_epochs", "act_range_epochs", "nThreads", "GPU", "eval_start_epoch"):
            _at_least(self, key, 0)
        for key in ("iters_per_epoch", "batchSize", "latent_dim", "test_batch_size", "eval_every", "log_interval"):
            _at_least(self, key, 1)
        for key in ("lr_S", "lr_G", "temperature"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} = {getattr(self, key)} must be positive")
        if self.img_size % 4 or self.img_size <= 0:
            raise ConfigError(f"img_size = {self.img_size} must be a positive multiple of 4 "
                              f"(the generator upsamples twice)")
        if self.channels != 3:
            raise ConfigError(f"channels = {self.channels}: the teachers take RGB images, set channels = 3")
        if not 0 <= self.lambda_l <= self.lambda_u <= 1:
            raise ConfigError(f"lambda_l = {self.lambda_l} and lambda_u = {self.lambda_u} must satisfy "
                              f"0 <= lambda_l <= lambda_u <= 1")
        for key in ("norm_mean", "norm_std"):
            value = getattr(self, key)
            if value and len(value) != self.channels:
                raise ConfigError(f"{key} = {value} needs {self.channels} values, one per channel, or [] for the "
                                  f"dataset's default")
        if any(s <= 0 for s in self.norm_std):
            raise ConfigError(f"norm_std = {self.norm_std} must be positive")
        for key in ("eval_cache", "pool_cache"):
            value = getattr(self, key)
            # A path must look like one, so that a mistyped word ("false", "none") is not taken for a folder.
            if value not in EVAL_CACHE_MODES and not (os.sep in value or value.startswith("~")):
                raise ConfigError(f"{key} = {value!r} is not valid: auto (the default cache folder), off, or a "
                                  f"directory path such as ./{key}")
            if value not in EVAL_CACHE_MODES and os.path.isfile(os.path.expanduser(value)):
                raise ConfigError(f"{key} = {value!r} is a file: give a directory, auto or off")
        self._validate_student_losses()
        check_pool_options(self)
        return self

    def _validate_student_losses(self) -> None:
        if not self.student_losses:
            raise ConfigError(f"student_losses = [] names no term; choose from: {', '.join(student_loss_names())}")
        for name in self.student_losses:
            if name not in student_loss_names():
                raise ConfigError(f"student_losses = {self.student_losses}: {name!r} is not a registered term; "
                                  f"choose from: {', '.join(student_loss_names())}")
        if len(set(self.student_losses)) != len(self.student_losses):
            raise ConfigError(f"student_losses = {self.student_losses} lists a term twice")
        _choice(self, "student_input_filter", input_filter_names())
        _choice(self, "kl_reduction", KL_REDUCTIONS)
        for key in ("lowpass_d0", "attention_temperature"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} = {getattr(self, key)} must be positive")
        for key in ("alpha", "ce_weight", "feature_alignment_weight", "attention_weight", "cam_weight",
                    "reliable_ce_weight", "pseudo_label_beta", "pseudo_label_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} = {getattr(self, key)} must be at least 0")
        if not 0 < self.reliable_ce_tau <= 1:
            raise ConfigError(f"reliable_ce_tau = {self.reliable_ce_tau} must be in (0, 1]: a difficulty "
                              f"1 - p(label) below it marks an easy sample")
        if not 0 <= self.pseudo_label_lower <= self.pseudo_label_upper <= 1:
            raise ConfigError(f"pseudo_label_lower = {self.pseudo_label_lower} and pseudo_label_upper = "
                              f"{self.pseudo_label_upper} must satisfy 0 <= lower <= upper <= 1 (normalised entropy)")

    def schedule(self, net: str) -> tuple[float, str, list[int], float]:
        """(base rate, policy, steps, decay) of the student (``net = "S"``) or the generator (``"G"``)."""
        return (getattr(self, f"lr_{net}"), getattr(self, f"lrPolicy_{net}"), getattr(self, f"step_{net}"),
                getattr(self, f"decayRate_{net}"))

    def evaluates_after(self, epoch: int) -> bool:
        """Whether the student is evaluated after ``epoch`` (0-based): always after the last one."""
        last = epoch == self.nEpochs - 1
        return last or (epoch >= self.eval_start_epoch and (epoch + 1) % self.eval_every == 0)

    @property
    def generator_kind(self) -> str:
        if self.generator:
            return self.generator
        return "conditional_bn" if self.dataset == "imagenet" else "label_embedding"

    def student_spec(self) -> StudentSpec:
        """The student these options train: bit-widths, quantizers, implementation and ``act_types``."""
        return StudentSpec.of(self.qw, self.qa, mode=self.act_mode, granularity=self.weight_granularity,
                              impl=self.quant_impl, act_types=self.act_types)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_hocon(self) -> str:
        return HOCONConverter.to_hocon(ConfigFactory.from_dict(self.to_dict())) + "\n"


def _choice(options: Options, key: str, allowed) -> None:
    value = getattr(options, key)
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r} is not valid; choose one of: {', '.join(map(str, allowed))}")


def _at_least(options: Options, key: str, minimum: int) -> None:
    value = getattr(options, key)
    if value < minimum:
        raise ConfigError(f"{key} = {value} must be at least {minimum}")
