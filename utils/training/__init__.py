"""Zero-shot QAT itself: the trainer (one iteration in ``Trainer.step``), the conditional generator, pools of
synthetic images (``pools/``: synthesis, cache, the iteration on a pool), the generator's and the student's losses
(``losses/``), optimizers and schedules, progress, the metrics writer, test-set accuracy, the one owner of what an
iteration changes (``state``), the checkpoint files, and the iteration replayed as a CUDA graph (``graphs``, its
self-check in ``graph_check``). Imports :mod:`utils.system`, :mod:`utils.models` and ``quantization_utils``; the
trainer is handed its test loader, so nothing here imports :mod:`utils.data`.
"""
