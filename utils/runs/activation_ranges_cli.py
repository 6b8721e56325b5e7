"""Per-layer, per-channel activation ranges of a teacher and the error of layer-wise, channel-wise and GranQ
quantization (the act_modes ``layerwise``, ``channel`` and ``granq``): the command line of
``tools/activation_ranges.py``.

    python tools/activation_ranges.py --conf_path CIFAR/cifar10_resnet20.hocon [--set key=value ...]
        [--source real|generator|noise] [--run RUN_DIR] [--bits 4] [--batch-size 64] [--output-dir DIR]

The batch: real test images from ``dataPath`` (``real``), images from the generator saved in a run's
``checkpoint.pt`` (``generator``, with ``--run``), or Gaussian noise in the normalised input space
(``noise``). By default: the generator when ``--run`` is given, else real images when ``dataPath`` holds
an ImageFolder, else noise. With ``--run`` and no ``--conf_path`` the run's own options and teacher are used.
The activations measured are those of the config's ``act_types`` (``--set 'act_types=[relu, hardswish]'``).
Writes a PNG figure, a markdown table and a CSV into the output directory and prints the table.
"""

import argparse
import logging
import os
import sys

import torch

from quantization_utils import activation_classes, check_bits

from ..data.loaders import build_test_loader, find_image_folder
from ..models import build_teacher
from ..reports.activation_ranges import measure_activation_ranges, stats_table, write_csv, write_figure
from ..system.errors import UserError
from ..training.checkpoints import RunFileError, find_checkpoint, load_run_file
from ..training.generator import build_generator
from .config import load_options, options_from_dict
from .saved import saved_options

__all__ = ["build_parser", "main", "run"]

logger = logging.getLogger("granq")
SOURCES = ("real", "generator", "noise")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conf_path", help="hocon config naming the teacher (network, teacher_weights, dataPath)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--run", metavar="RUN_DIR", help="a run directory (or its checkpoint.pt) with a generator")
    parser.add_argument("--source", choices=SOURCES, help="where the batch comes from (default: see above)")
    parser.add_argument("--bits", type=int, help="activation bit-width (default: the config's qa)")
    parser.add_argument("--batch-size", type=int, default=64, help="images in the batch (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch (and of a random teacher)")
    parser.add_argument("--output-dir", help="where to write the figure and tables (default: the run directory "
                                             "with --run, else ./activation_ranges)")
    return parser


def _load_run(path: str) -> dict:
    file = find_checkpoint(path) if os.path.isdir(path) else path
    try:
        return load_run_file(file, require=("generator",))
    except RunFileError as error:
        raise UserError(f"--run: {error}") from None


def _options(args, checkpoint):
    if args.conf_path:
        return load_options(args.conf_path, args.set)
    if checkpoint is None:
        raise UserError("give --conf_path (and --set overrides), or --run RUN_DIR to use a run's options")
    values = dict(checkpoint["options"])
    # The run recorded where its teacher's weights really came from; prefer that file, so the figure
    # shows the teacher the generator was trained against even if the config said "published".
    source = checkpoint.get("meta", {}).get("teacher_weights", "")
    if source == "random" or os.path.isfile(source):
        values["teacher_weights"] = source
    return saved_options(values, args.set)


def _real_batch(options, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    dataset = build_test_loader(options).dataset
    # A random subset: the test folders are sorted by class, so the first images are all one class.
    indices = torch.randperm(len(dataset), generator=generator)[:batch_size].tolist()
    return torch.stack([dataset[i][0] for i in indices])


def _generator_batch(checkpoint: dict, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    # The run's own options build its generator, whatever --conf_path says about the teacher.
    options = options_from_dict(checkpoint["options"])
    model = build_generator(options)
    model.load_state_dict(checkpoint["generator"])
    z = torch.randn(batch_size, options.latent_dim, generator=generator)
    labels = torch.randint(0, options.nClasses, (batch_size,), generator=generator)
    # Train mode: batch statistics in its BatchNorms, as during training, when the student saw these images.
    model.train()
    with torch.no_grad():
        return model(z, labels)


def _noise_batch(options, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch_size, options.channels, options.img_size, options.img_size, generator=generator)


def _pick_source(args, options) -> str:
    if args.source:
        return args.source
    if args.run:
        return "generator"
    if options.dataPath and find_image_folder(options.dataPath):
        return "real"
    logger.warning("no --run and no ImageFolder at dataPath = %r: using Gaussian noise", options.dataPath)
    return "noise"


def run(args) -> dict:
    """Measure and write the outputs; return their paths."""
    checkpoint = _load_run(args.run) if args.run else None
    options = _options(args, checkpoint)
    source = _pick_source(args, options)
    if source == "generator" and checkpoint is None:
        raise UserError("--source generator needs --run RUN_DIR (a run's checkpoint.pt holds the generator)")
    bits = options.qa if args.bits is None else args.bits
    try:
        check_bits(bits)
    except ValueError as error:
        raise UserError(f"--bits: {error}") from None
    if args.batch_size < 2:
        raise UserError(f"--batch-size {args.batch_size}: use at least 2 images (the generator's BatchNorm)")
    torch.manual_seed(args.seed)  # a random teacher is initialised from the global generator
    teacher, teacher_source = build_teacher(options.network, options.teacher_weights)
    generator = torch.Generator().manual_seed(args.seed)
    if source == "real":
        images = _real_batch(options, args.batch_size, generator)
    elif source == "generator":
        images = _generator_batch(checkpoint, args.batch_size, generator)
    else:
        images = _noise_batch(options, args.batch_size, generator)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        stats = measure_activation_ranges(teacher.to(device), images.to(device), bits,
                                          activation_classes(options.act_types))
    except ValueError as error:
        raise UserError(str(error)) from None

    if args.output_dir:
        output_dir = args.output_dir
    elif args.run:
        output_dir = args.run if os.path.isdir(args.run) else os.path.dirname(os.path.abspath(args.run))
    else:
        output_dir = "activation_ranges"
    os.makedirs(output_dir, exist_ok=True)
    stem = os.path.join(output_dir, f"activation_ranges_{options.network}_A{bits}_{source}")
    title = (f"{options.network} ({os.path.basename(teacher_source)}), {len(images)} {source} images, "
             f"A{bits}")
    table = stats_table(stats, bits)
    with open(stem + ".md", "w") as f:
        f.write(f"Activation ranges of {title}: the output of each activation of act_types = "
                f"{list(options.act_types)} (the input of each QuantAct).\n"
                f"Relative error = ||Q(x) - x||^2 / ||x||^2 over the batch; spread = largest / median range "
                f"(dead channels left out).\n\n{table}")
    write_csv(stats, stem + ".csv")
    write_figure(stats, bits, stem + ".png", title)
    sys.stdout.write(table)
    paths = {"figure": stem + ".png", "table": stem + ".md", "csv": stem + ".csv"}
    logger.info("wrote %s", ", ".join(paths.values()))
    return paths


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
