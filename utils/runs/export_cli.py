"""``tools/export.py``: write a saved student as ``student.safetensors`` (packed integer weights) and
``student.onnx``, print their sizes and, where the run's test set is reachable, onnxruntime's top-1 beside
the PyTorch student's.

    python tools/export.py RUN_DIR|STUDENT_FILE [--output DIR] [--which best|last] [--format packed onnx]
        [--set dataPath=...] [--no-eval] [--measure-torch]

The last line on stdout is a JSON object: ``paths`` and ``bytes`` of each file written (and ``bytes`` of
the float state dict, ``float_state_dict``), ``deploys_as`` (with onnx), and after the test set ``onnxruntime_top1``,
``torch_top1`` (``torch_top1_from``: ``recorded`` where the run recorded it on the CPU on this test set, else
``measured``; ``--measure-torch`` always measures it), ``test_images``, and the differences of the logits on
``compared_images`` images (the first 1000, all when measured): ``max_logit_difference``,
``median_logit_difference``, ``top1_disagreements`` (:func:`.runtime.compare_on_test_set`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from ..data.loaders import build_test_loader
from ..data.workers import close_workers
from ..export.common import build_student, require
from ..export.onnx_export import export_onnx
from ..export.onnx_modules import deploy_model, deployment
from ..export.packed import save_packed
from ..export.runtime import compare_on_test_set, onnx_session
from ..system.errors import UserError, report_errors
from ..training.checkpoints import BEST_STUDENT, CHECKPOINT, load_run_file
from .config import parse_override
from .saved import EVAL_KEYS, saved_options

__all__ = ["FILE_NAMES", "build_parser", "export", "main", "student_file"]

logger = logging.getLogger("granq")
FORMATS = ("packed", "onnx")
FILE_NAMES = {"packed": "student.safetensors", "onnx": "student.onnx"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("source", metavar="RUN_DIR|STUDENT_FILE", help="a run directory or a saved student (.pt)")
    parser.add_argument("--output", metavar="DIR", help="where to write the files (default: RUN_DIR/export)")
    parser.add_argument("--which", choices=("best", "last"), default="best",
                        help=f"of a run directory: best ({BEST_STUDENT}, default) or last ({CHECKPOINT})")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), dest="formats",
                        help="what to write (default: both)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"change how the test set is read: {', '.join(EVAL_KEYS)}")
    parser.add_argument("--no-eval", action="store_true", help="do not evaluate on the test set")
    parser.add_argument("--measure-torch", action="store_true",
                        help="run the PyTorch student on the whole test set, even where its run recorded its top-1")
    return parser


def student_file(source: str, which: str = "best") -> tuple[str, str]:
    """The student file to export for ``source`` and the run directory it belongs to.

    A run directory gives its ``best_student.pt`` (``which = "best"``) or ``checkpoint.pt`` (``"last"``; a run
    without training has only ``best_student.pt``, its last student too); a file is taken as it is.
    """
    if os.path.isfile(source):
        return source, os.path.dirname(os.path.abspath(source))
    if not os.path.isdir(source):
        raise UserError(f"{source!r} is neither a saved student nor a run directory")
    names = (BEST_STUDENT,) if which == "best" else (CHECKPOINT, BEST_STUDENT)
    for name in names:
        if os.path.isfile(os.path.join(source, name)):
            return os.path.join(source, name), source
    raise UserError(f"run directory {source!r} holds no {' or '.join(names)}: no student was saved there (a run "
                    f"saves {BEST_STUDENT} at its first evaluation)")


def _share(size: int, whole: int) -> str:
    return f"{size:,} bytes ({100.0 * size / whole:.1f} % of the float state dict's {whole:,})"


def _recorded_top1(record: dict, args) -> float | None:
    """The top-1 the run recorded for this student, where evaluating it here would repeat it: on the CPU, on the
    run's own test set."""
    top1 = record.get("top1", record.get("last_top1"))
    on_cpu = str(record.get("meta", {}).get("device", "")).startswith("cpu")
    same_data = not any(parse_override(text)[0] == "dataPath" for text in args.set)
    return top1 if top1 is not None and on_cpu and same_data and not args.measure_torch else None


def _compare(student, options, onnx_path: str, recorded_top1: float | None) -> dict:
    try:
        loader = build_test_loader(options, torch.device("cpu"))
    except UserError as error:
        logger.warning("no test set, no accuracies: %s", error)
        return {}
    try:
        return compare_on_test_set(student, onnx_session(onnx_path), loader, recorded_top1)
    finally:
        close_workers(loader)


def export(args) -> dict:
    """Write the files ``args`` asks for and return the summary (see the module docstring)."""
    needed = {"packed": ("safetensors",), "onnx": ("onnx", "onnxscript", "onnxruntime")}
    for package in [name for kind in args.formats for name in needed[kind]]:
        require(package)  # a missing package fails before anything is read or written
    file, run_dir = student_file(args.source, args.which)
    record = load_run_file(file)
    options = saved_options(record["options"], args.set, EVAL_KEYS, "the exporter")
    student = build_student(record["options"], record["student"], file)
    if "onnx" in args.formats:
        deploy_model(student)  # what ONNX cannot express fails here, before anything is written
    output = args.output or os.path.join(run_dir, "export")
    os.makedirs(output, exist_ok=True)
    source = {"file": os.path.abspath(file), "epoch": record.get("epoch"),
              "top1": record.get("top1", record.get("last_top1")), "meta": record.get("meta", {})}
    float_bytes = sum(t.numel() * t.element_size() for t in record["student"].values())
    summary = {"source": source["file"], "paths": {}, "bytes": {"float_state_dict": float_bytes}}
    for kind in args.formats:
        path = os.path.join(output, FILE_NAMES[kind])
        if kind == "packed":
            size = save_packed(student, path, record["options"], source)
        else:
            size = export_onnx(student, options, path, source)
        summary["paths"][kind], summary["bytes"][kind] = os.path.abspath(path), size
        print(f"{FILE_NAMES[kind]}: {_share(size, float_bytes)}", flush=True)
    if "onnx" in args.formats:
        summary["deploys_as"] = deployment(options.act_mode)
    if "onnx" in args.formats and not args.no_eval:
        summary.update(_compare(student, options, summary["paths"]["onnx"], _recorded_top1(record, args)))
        if "torch_top1" in summary:
            print(f"test set ({summary['test_images']} images): PyTorch student top-1 {summary['torch_top1']:.2f} % "
                  f"({summary['torch_top1_from']}), onnxruntime {summary['onnxruntime_top1']:.2f} %; logits on "
                  f"{summary['compared_images']} images: largest difference {summary['max_logit_difference']:.3g}, "
                  f"median {summary['median_logit_difference']:.3g}", flush=True)
    return summary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("onnxscript").setLevel(logging.WARNING)  # its optimiser logs every rewrite at INFO

    def command():
        print(json.dumps(export(args)), flush=True)

    return report_errors(command)
