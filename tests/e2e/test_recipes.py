"""Every recipe of recipes/ runs one short epoch (a pool's: on a tiny pool) and records what it names."""

import json
import os

import pytest
import torch

from utils.runs.config import recipe_names

from ..conftest import CIFAR10A_CONF, last_json, run_main, tiny_run_args

# recipe -> (image_source, act_mode, weight_granularity, terms recorded per iteration)
RECIPES = {
    "granq": ("generator", "granq", "kernel", {"kd", "loss_G", "marginal", "onehot"}),
    "adadfq": ("generator", "layerwise", "channel", {"kd", "loss_G", "marginal", "onehot"}),
    "gdfq": ("generator", "layerwise", "channel", {"kl", "ce", "loss_G", "onehot"}),
    "plus": ("generator", "granq", "kernel", {"kd", "cam", "reliable_ce"}),
    "zeroq": ("pool", "layerwise", "channel", set()),
    "synq": ("pool", "layerwise", "channel", {"kl", "feature_alignment", "cam", "reliable_ce", "lowpass_kept"}),
    "synq_granq": ("pool", "granq", "channel", {"kl", "feature_alignment", "cam", "reliable_ce", "lowpass_kept"}),
}
# A pool of 16 images in batches of 8, two synthesis steps each.
TINY_POOL = ["pool_size=16", "pool_batch=8", "pool_iters=2"]


def test_every_recipe_is_covered():
    assert set(recipe_names()) == set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_runs_a_short_epoch(recipe, tmp_path, cifar_folder):
    image_source, act_mode, granularity, terms = RECIPES[recipe]
    sets = [f"recipe={recipe}", "quant_impl=eager", *(TINY_POOL if image_source == "pool" else []),
            *(["nEpochs=0"] if recipe == "zeroq" else [])]  # the test's own nEpochs = 1 would win over the recipe's
    code, lines = run_main(tiny_run_args(tmp_path, cifar_folder, *[p for s in sets for p in ("--set", s)],
                                         conf=CIFAR10A_CONF))
    assert code == 0
    summary = last_json(lines)
    assert (summary["image_source"], summary["act_mode"], summary["weight_granularity"]) == (image_source, act_mode,
                                                                                             granularity)
    assert summary["student_top1"] is not None and summary["epochs"] == (0 if recipe == "zeroq" else 1)
    if recipe == "zeroq":  # post-training: the tracked ranges were calibrated on the pool's images
        student = torch.load(os.path.join(summary["run_dir"], "best_student.pt"), weights_only=False)["student"]
        ranges = [(student[k.replace("x_max", "x_min")], v) for k, v in student.items() if k.endswith("x_max")]
        assert ranges and all((high > low).all() for low, high in ranges)
        return
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        record = json.loads(f.readline())
    assert terms <= record.keys(), sorted(record)
