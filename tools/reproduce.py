"""Whole tables in one command: run every cell of a plan that has no result yet, then write the table.

    python tools/reproduce.py --plan cifar [--seeds 1 2 3] [--jobs N] [--gpus 0,1,...] [--dry-run]
    python tools/reproduce.py --plan imagenet --set dataPath=/data/imagenet --gpus 0,1,2,3
    python tools/reproduce.py --plan ablation          # act_mode layerwise/channel/granq on CIFAR-100
    python tools/reproduce.py --plan my_plan.hocon     # a copy of a file in tools/plans, edited

A plan (tools/plans/*.hocon) lists configs, bits, act_modes, seeds and extra ``set`` overrides; its cells are
every combination. Cell NAME (``{config}_W{b}A{b}_{act_mode}_id{seed}``) runs CIFAR/main.py or
ImageNet/main.py with ``save_path=<save_path>/<plan>/NAME``, its output appended to ``cell.log`` there.
Calling again is safe: cells with a summary.json are skipped, cells with a checkpoint.pt and no summary
are resumed (``--resume RUN_DIR``), the rest start afresh. ``--jobs N`` runs N cells at once; with
``--gpus 0,1`` each run sees one GPU (CUDA_VISIBLE_DEVICES, GPU=0), otherwise every device. ``--set
key=value`` goes to every cell, ``--seeds`` replaces the plan's, ``--save-path`` its save_path (default
./runs), ``--max-cells N`` starts at most N cells, ``--dry-run`` prints the commands and runs nothing.
Ctrl-C (or SIGTERM) sends each run one SIGTERM: it checkpoints, and the next call resumes it.
A failed cell is reported with its log and the others go on; the exit code is then 1 (2: a bad plan).
At the end the table of the finished cells goes to ``<save_path>/<plan>/results.md`` and to stdout.

Several calls may share a plan and folder: a running cell holds ``<cell>/cell.lock`` and the other calls skip
it, so each cell runs once. Teachers and test sets are fetched once before any cell starts. A run gets
SIGTERM (and checkpoints) when the call that started it dies, even by ``kill -9`` (Linux; elsewhere it runs
on to its end). With ``--jobs N`` and several visible GPUs, and no ``--gpus``, the cells are spread over all
of them. ``--status`` prints each cell's state.

    python tools/reproduce.py --plan imagenet --set dataPath=/data/imagenet --launcher slurm \
        --partition gpu --time 24:00:00 --gpus-per-cell 4 --cpus-per-gpu 8 [--account A]
    python tools/reproduce.py --plan imagenet --set dataPath=/data/imagenet --launcher slurm --status

``--launcher slurm`` submits each missing cell as a SLURM job through submitit (``pip install submitit``)
and returns; the flags may instead come from a ``slurm { ... }`` block of the plan. A job checkpoints at
its time limit or at a preemption and is requeued to resume; see docs/tools.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.sweeps.reproduce_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
