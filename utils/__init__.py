"""The zero-shot QAT application around ``quantization_utils``, in sub-packages by concern.

Each sub-package imports only from those listed before it (``tests/unit/test_layering.py`` checks this and that
no modules import each other in a circle); ``quantization_utils`` imports nothing from here:

1. ``system``: errors, devices, torchrun, file locks, atomic file writes, stop signals;
2. ``models``: the model registry, the option-A ResNet-20, teachers and their weights;
3. ``data``: the test sets, the evaluation cache, loader workers;
4. ``training``: the trainer, the generator, synthetic image pools, losses, optimizers, the training state,
   checkpoints, CUDA graphs, progress, metrics;
5. ``reports``: results tables, plots, published numbers, activation ranges;
6. ``export``: the packed integer weights, the ONNX student, running them;
7. ``runs``: the config, saved runs' options with overrides, evaluating saved students;
8. ``sweeps``: plans of many runs, their cells, the local and the SLURM launcher.

Every command line is a module here: ``main.py``'s is ``runs/run.py``, and each ``tools/NAME.py``'s a
``NAME_cli.py`` in the lowest sub-package that has what it needs.
"""
