"""``tools/synthesize.py``: build the pool of synthetic images that a config's runs read (``image_source = pool``), on
its own, for example ahead of a plan whose cells then all find it in the cache.

    python tools/synthesize.py --conf_path CIFAR/cifar10_resnet20a.hocon --set recipe=synq [--set key=value ...]

The pool is the one a run of the same config and overrides reads: the same teacher, synthesis keys (``pool_*``) and
``pool_cache``. An existing pool is read and checked, a partly synthesised one resumed. The last line on stdout is
the pool's summary as JSON, with its ``folder``; Ctrl-C stops with the finished batches kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..models import build_teacher, check_teacher
from ..system import distributed
from ..system.devices import configure_backends
from ..system.errors import report_errors
from ..system.stopping import RunInterrupted
from ..training.pools import check_pool_options, load_pool
from .config import load_options

__all__ = ["build_parser", "main", "synthesize"]

logger = logging.getLogger("granq")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--conf_path", required=True, help="hocon config file, as for main.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (e.g. recipe=synq, pool_size=1024, pool_cache=DIR); repeatable")
    return parser


def synthesize(args) -> dict:
    """Read or build the pool of ``args``' config; return its summary with its ``folder``."""
    options = load_options(args.conf_path, args.set)
    spec = check_pool_options(options)
    device = distributed.init_from_env(options.GPU)
    configure_backends(options.deterministic, device)
    teacher, source = build_teacher(options.network, options.teacher_weights)
    check_teacher(teacher, options.network, options.nClasses, options.img_size, options.channels)
    pool = load_pool(spec, teacher, options.pool_cache, device, source, options.log_interval)
    return {**pool.summary, "folder": pool.folder}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr,
                        force=True)

    def command():
        print(json.dumps(synthesize(args)), flush=True)

    try:
        return report_errors(command)
    except RunInterrupted as interrupted:  # Ctrl-C: the finished batches are kept
        print(str(interrupted), file=sys.stderr)
        return interrupted.exit_code
    finally:
        distributed.shutdown()
