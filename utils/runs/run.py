"""Command line shared by ``CIFAR/main.py`` and ``ImageNet/main.py``.

    python CIFAR/main.py --conf_path CIFAR/cifar10_resnet20.hocon --id 1 --qw 3 --qa 3 [--set key=value ...]
    python CIFAR/main.py --resume RUN_DIR
    python CIFAR/main.py --eval RUN_DIR [--set dataPath=...]

The last line written to stdout is the run summary as one line of JSON; logs go to stderr and to
``train.log`` in the run directory.
"""

import argparse
import datetime
import json
import logging
import os
import random
import re
import sys
import traceback

import numpy as np
import torch

from quantization_utils import (
    QuantConv2d,
    QuantLinear,
    has_tracked_ranges,
    quant_path,
    shared_act_quantizers,
    unquantized_inputs,
)

from ..data.loaders import build_test_loader
from ..data.workers import close_workers
from ..models import build_teacher, check_teacher, example_image
from ..reports.plots import plot_run
from ..system import distributed
from ..system.devices import check_torch, configure_backends
from ..system.errors import UserError
from ..system.stopping import RunInterrupted
from ..training.checkpoints import RunFileError, atomic_save_json, find_checkpoint, load_run_file, save_run_file
from ..training.graphs import check_cuda_graph, use_cuda_graphs
from ..training.losses import build_student_losses
from ..training.pools import run_pool
from ..training.trainer import Trainer
from .config import LEGACY_KEYS, load_options, options_from_dict
from .saved import evaluate_saved, saved_options

__all__ = ["RESUME_KEYS", "Run", "build_parser", "main", "make_run_dir", "run", "setup"]

logger = logging.getLogger("granq")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
# What summary.json records of a run's pool (its own summary.json in the pool cache holds the rest).
POOL_RECORDED = ("key", "images", "final_bns", "teacher_acc", "synthesis_seconds")
# Keys a resumed run may change: where and how it evaluates, logs, computes and finds its pool, never what it trains.
RESUME_KEYS = ("GPU", "dataPath", "nThreads", "test_batch_size", "log_interval", "eval_every", "eval_start_epoch",
               "eval_cache", "tensorboard", "cuda_graph", "pool_cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="GranQ zero-shot quantization-aware training")
    parser.add_argument("--conf_path", help="hocon config file")
    parser.add_argument("--id", type=int, default=0, help="experiment id; the random seed is id + 1")
    parser.add_argument("--qw", type=int, help="weight bits (overrides the config)")
    parser.add_argument("--qa", type=int, help="activation bits (overrides the config)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key; repeatable")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--force", action="store_true",
                        help="with --resume: accept changes to keys that change the trained student (by default "
                             f"only {', '.join(RESUME_KEYS)} may change)")
    parser.add_argument("--eval", metavar="RUN_DIR_OR_FILE",
                        help="evaluate a saved student (a run directory, a .pt file, or an exported student.onnx "
                             "or student.safetensors) and print its summary; --set dataPath=... points it at the "
                             "test set")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_run_dir(options, run_id: int) -> str:
    """A new directory under ``save_path``; an existing one is never reused or deleted."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    network = re.sub(r"[^\w.-]", "-", options.network)  # torchvision:NAME, MODULE:FUNCTION: no colon in paths
    name = (f"{options.experimentID}{run_id:02d}_{network}_W{options.qw}A{options.qa}_"
            f"{options.act_mode}_{options.weight_granularity}_{stamp}")
    try:
        os.makedirs(options.save_path, exist_ok=True)
        for suffix in [""] + [f"-{n}" for n in range(1, 1000)]:
            path = os.path.join(options.save_path, name + suffix)
            try:
                os.mkdir(path)
                return path
            except FileExistsError:
                continue
    except OSError as error:
        raise UserError(f"save_path = {options.save_path!r} is not writable ({error.strerror}); "
                        f"set save_path to a folder you can write") from None
    raise UserError(f"could not create a new run directory under {options.save_path!r}")


def _add_file_log(run_dir: str) -> logging.Handler:
    handler = logging.FileHandler(os.path.join(run_dir, "train.log"))
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def _load_checkpoint(run_dir: str) -> dict:
    try:
        return load_run_file(find_checkpoint(run_dir), require=("rng", "meta"))  # a pool's run has no generator
    except RunFileError as error:
        raise UserError(f"--resume: {error}") from None


def _resume_options(args, checkpoint: dict):
    """The run's own options, with the changes that ``--conf_path``, ``--set``, ``--qw`` and ``--qa`` ask for.

    Changes to :data:`RESUME_KEYS` are applied and logged; any other change is refused unless ``--force``.
    """
    saved = options_from_dict(checkpoint["options"])
    if args.conf_path:
        requested = load_options(args.conf_path, args.set, qw=args.qw, qa=args.qa)
    else:
        bits = [f"{key}={value}" for key, value in (("qw", args.qw), ("qa", args.qa)) if value is not None]
        requested = saved_options(saved.to_dict(), [*args.set, *bits])
    changed = {k: (v, getattr(requested, k)) for k, v in saved.to_dict().items() if getattr(requested, k) != v}
    refused = {k: change for k, change in changed.items() if k not in RESUME_KEYS}
    if refused and not args.force:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise UserError(f"--resume: {', '.join(refused)} cannot change in a resumed run ({listed}); a resumed run "
                        f"may change only {', '.join(RESUME_KEYS)}. Add --force to change the others anyway")
    for key, (old, new) in changed.items():
        logger.info("--resume: %s changed from %r to %r%s", key, old, new,
                    " (--force)" if key in refused else "")
    return requested


class Run:
    """A prepared run: the trainer, its directory and its log file; call :meth:`close` when done."""

    def __init__(self, trainer: Trainer, run_dir: str, log_handler: logging.Handler | None):
        self.trainer, self.run_dir, self._log_handler = trainer, run_dir, log_handler

    def close(self) -> None:
        close_workers(self.trainer.test_loader)
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None


def log_unquantized_inputs(student: torch.nn.Module, options, device) -> list[str]:
    """Log (and return) the Conv2d / Linear layers whose input no quantized activation precedes: they stay
    in float on integer hardware, or need an activation type added to ``act_types``. Warn when a quantizer
    that tracks ranges is called at several places per forward (a reused activation module)."""
    image = example_image(options.channels, options.img_size, device)
    names = unquantized_inputs(student, image)
    layers = {name: m for name, m in student.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    logger.info("%d of %d Conv2d/Linear layers read inputs that no quantized activation (act_types = %s) "
                "precedes, so they compute on float inputs: %s", len(names), len(layers), options.act_types,
                _first(names))
    float_weights = [name for name, m in layers.items() if not isinstance(m, (QuantConv2d, QuantLinear))]
    if float_weights:
        logger.warning("%d layers are subclasses of Conv2d/Linear with their own forward and keep float weights: %s",
                       len(float_weights), _first(float_weights))
    shared = shared_act_quantizers(student, image) if has_tracked_ranges(student) else {}
    if shared:
        logger.warning("%d activation quantizers are called at several places per forward (one activation module "
                       "reused), so each keeps one range for all its places (act_mode = %s): %s", len(shared),
                       options.act_mode, _first([f"{name} x{n}" for name, n in shared.items()]))
    return names


def _first(names: list[str], count: int = 8) -> str:
    return ", ".join(names[:count]) + (f", ... ({len(names) - count} more)" if len(names) > count else "")


def setup(args) -> Run:
    """Validate the inputs, build teacher, data and trainer, and create (or reopen) the run directory."""
    checkpoint = None
    if args.resume:
        checkpoint = _load_checkpoint(args.resume)
        options = _resume_options(args, checkpoint)
        run_id, seed = checkpoint["meta"]["id"], checkpoint["meta"]["seed"]
    else:
        if not args.conf_path:
            raise UserError("--conf_path is required (or --resume RUN_DIR)")
        options = load_options(args.conf_path, args.set, qw=args.qw, qa=args.qa)
        run_id, seed = args.id, args.id + 1
    device = distributed.init_from_env(options.GPU)
    check_cuda_graph(options.cuda_graph, device)
    backends = configure_backends(options.deterministic, device)  # before the first CUDA computation
    # One global stream on every rank: the same random teacher (teacher_weights = random) and generator
    # weights everywhere. Each rank's training noise has its own stream (utils.training.trainer.noise_generator).
    seed_everything(seed)

    # Everything that can fail on bad input happens before the run directory exists.
    teacher, teacher_source = build_teacher(options.network, options.teacher_weights)
    check_teacher(teacher, options.network, options.nClasses, options.img_size, options.channels)
    build_student_losses(options, teacher)  # a term that reads layers the teacher lacks fails here
    test_loader = build_test_loader(options, device)
    # image_source = pool: read from the pool cache, or synthesised (and cached) now, before the run directory exists.
    pool = run_pool(options, teacher, device, teacher_source)

    run_dir = args.resume
    if run_dir is None:
        run_dir = distributed.broadcast_object(make_run_dir(options, run_id) if distributed.rank() == 0 else None)
    log_handler = None
    if distributed.rank() == 0:
        log_handler = _add_file_log(run_dir)
        if checkpoint is None:
            with open(os.path.join(run_dir, "config.hocon"), "w") as f:
                f.write(options.to_hocon())
    for key, reason in LEGACY_KEYS.items():
        logger.debug("config key %s has no effect: %s", key, reason)
    logger.info("run directory %s on %s (seed %d, %d process(es))", run_dir, device, seed, distributed.world_size())
    meta = {"id": run_id, "seed": seed, "teacher_weights": teacher_source, "device": str(device), **backends}
    if pool is not None:
        meta["pool"] = {key: pool.summary[key] for key in POOL_RECORDED} | {"folder": pool.folder}
    trainer = Trainer(options, teacher, test_loader, device, run_dir, meta, pool)
    log_unquantized_inputs(trainer.student, options, device)
    if checkpoint is not None:
        try:
            trainer.load_state_dict(checkpoint)
        except (RuntimeError, KeyError, ValueError) as error:
            raise UserError(f"--resume {run_dir!r}: the checkpoint does not fit network {options.network!r} "
                            f"with this config; is it from another model? ({str(error).splitlines()[0]})") from None
        logger.info("resumed at epoch %d, iteration %d", trainer.epoch + 1, trainer.iteration)
    # After a resume, so that the self-check starts from the state the run continues from (and puts it back).
    use_cuda_graphs(trainer, options.cuda_graph)
    return Run(trainer, run_dir, log_handler)


def run(args) -> dict:
    """Set up, train, draw the plots and write summary.json; return the summary."""
    prepared = setup(args)
    try:
        summary = prepared.trainer.fit()
        # Known only once the quantizers have run: whether they ran compiled, and if not, why.
        summary["quant_path"] = quant_path(prepared.trainer.options.quant_impl)
        if distributed.rank() == 0:
            plot_run(prepared.run_dir)
            save_run_file(summary, os.path.join(prepared.run_dir, "summary.json"), prepared.run_dir, atomic_save_json)
        # The other ranks wait for rank 0's plots and summary: a rank that tears down the process group while
        # a peer still works can make Gloo abort the peer at exit ("terminate called without an active exception").
        distributed.barrier()
        return summary
    finally:
        prepared.close()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun only rank 0 reports progress; the others speak up for warnings and errors.
    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format=LOG_FORMAT, stream=sys.stderr,
                        force=True)
    try:
        check_torch()
        summary = evaluate_saved(args.eval, overrides=args.set) if args.eval else run(args)
    except UserError as error:
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunInterrupted as interrupted:
        print(str(interrupted), file=sys.stderr)
        return interrupted.exit_code
    finally:
        distributed.shutdown()
    if is_main:
        print(json.dumps(summary), flush=True)
    return 0
