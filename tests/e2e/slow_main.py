"""``CIFAR/main.py`` with every training step and evaluation batch slowed down, and a line on stderr when each
epoch's training or evaluation starts, so that a test can send a signal while either one runs.

    python tests/e2e/slow_main.py ARGS...   # the arguments of CIFAR/main.py
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import utils.training.evaluate as evaluate_module  # noqa: E402
import utils.training.trainer as trainer_module  # noqa: E402
from utils.runs.run import main  # noqa: E402

PAUSE = 0.1  # seconds added to each training step and each evaluation batch


def marked(phase: str, function):
    def wrapper(self, *args, **kwargs):
        print(f"slow_main: {phase} epoch {len(self.metrics) + 1}", file=sys.stderr, flush=True)
        return function(self, *args, **kwargs)
    return wrapper


def paused(function):
    def wrapper(*args, **kwargs):
        time.sleep(PAUSE)
        return function(*args, **kwargs)
    return wrapper


class PausedLoader:
    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            time.sleep(PAUSE)
            yield batch


evaluate = evaluate_module.evaluate
evaluate_module.evaluate = lambda model, loader, device: evaluate(model, PausedLoader(loader), device)
trainer_module.Trainer.train_epoch = marked("training", trainer_module.Trainer.train_epoch)
trainer_module.Trainer._evaluate_student = marked("evaluating", trainer_module.Trainer._evaluate_student)
trainer_module.Trainer.step = paused(trainer_module.Trainer.step)

if __name__ == "__main__":
    sys.exit(main())
