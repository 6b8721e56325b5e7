"""Plans: a hocon file (``tools/plans/*.hocon``) with the keys of :data:`PLAN_KEYS`, expanded into cells.

Its cells are every config x bit-width x act_mode x seed, and with ``variants`` every config x variant x
bit-width x act_mode x seed: a variant is a named list of ``key=value`` overrides, and ``per_config`` may give a
config (by file name) only some of the variants and overrides of its own.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from dataclasses import dataclass

from pyhocon import ConfigFactory

from ..runs.config import load_options, parse_override
from ..system.errors import ConfigError, UserError
from .cells import ROOT, Cell, short_path

__all__ = ["DEFAULT_SAVE_PATH", "PLAN_KEYS", "PLANS_DIR", "Plan", "expand_cells", "load_plan", "resolve_plan"]

PLANS_DIR = os.path.join(ROOT, "tools", "plans")
DEFAULT_SAVE_PATH = "./runs"


# key -> (type, required, what it holds)
PLAN_KEYS = {
    "description": (str, False, "one line shown when the plan starts"),
    "configs": (list[str], True, "hocon configs; relative paths are read from the repository root"),
    "bits": (list[int], True, "bit-widths; each cell quantizes weights and activations to the same bits"),
    "act_modes": (list[str], True, "activation quantizers, passed as --set act_mode=...; \"config\": the one the "
                                   "config (and its recipe) names, not passed"),
    "seeds": (list[int], True, "run ids (--id); the random seed is id + 1"),
    "set": (list[str], False, "key=value overrides added to every cell"),
    "save_path": (str, False, f"cells go to <save_path>/<plan name>/<cell>/ (default {DEFAULT_SAVE_PATH})"),
    "slurm": (dict, False, "for --launcher slurm: partition, time, gpus_per_cell, cpus_per_gpu, account"),
    "variants": (dict, False, "variant name -> list of key=value overrides; each config runs every variant unless "
                              "per_config says otherwise, and the name goes into the cell's name"),
    "baseline": (str, False, "the variant the others are compared with in the results table (default baseline)"),
    "per_config": (dict, False, "config file name without .hocon -> {variants = [names it runs], set = [its own "
                                "key=value overrides]}, both optional"),
}
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*$")
FROM_CONFIG = "config"  # an act_modes entry: each cell's config (and its recipe) names the activation quantizer
# Config keys a cell sets itself; an override of one would make the cell's name lie.
RESERVED_KEYS = {"save_path": "use the plan's save_path or --save-path", "act_mode": "list it in act_modes",
                 "qw": "list the bit-width in bits", "qa": "list the bit-width in bits"}


@dataclass(frozen=True)
class Plan:
    name: str
    path: str
    description: str
    configs: tuple[str, ...]
    bits: tuple[int, ...]
    act_modes: tuple[str, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    save_path: str
    slurm: dict = dataclasses.field(default_factory=dict)  # checked: utils.sweeps.slurm.slurm_settings
    variants: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (name, overrides); none: cells keep their old names
    per_config: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = ()  # (stem, variant names, overrides)
    baseline: str = "baseline"  # the variant the others are compared with


def resolve_plan(name_or_path: str) -> str:
    """The plan file: a path to a hocon file, or the name of one in ``tools/plans``."""
    if os.path.isfile(name_or_path):
        return name_or_path
    named = os.path.join(PLANS_DIR, f"{name_or_path}.hocon")
    if os.sep not in name_or_path and os.path.isfile(named):
        return named
    known = sorted(f[:-len(".hocon")] for f in os.listdir(PLANS_DIR) if f.endswith(".hocon"))
    raise UserError(f"--plan {name_or_path!r}: no such file, and no plan of that name in {short_path(PLANS_DIR)} "
                    f"(plans there: {', '.join(known)})")


def _check_type(path: str, key: str, value, kind):
    item = getattr(kind, "__args__", (None,))[0]
    if item is None:
        ok = isinstance(value, kind)
    else:
        ok = isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    if not ok:
        what = {str: "a string", list[str]: "a list of strings", list[int]: "a list of integers",
                dict: "a block of keys, e.g. {partition = gpu}"}[kind]
        raise UserError(f"plan {path}: {key} must be {what}, got {value!r}")
    if item is not None and key != "set" and not value:
        raise UserError(f"plan {path}: {key} is empty; list at least one")
    if item is not None and len(set(value)) != len(value):
        raise UserError(f"plan {path}: {key} lists a value twice: {value}")
    return tuple(value) if item is not None else value


def load_plan(path: str) -> Plan:
    """Read and check a plan file; every error names the plan, the key and the fix."""
    try:
        values = dict(ConfigFactory.parse_file(path).as_plain_ordered_dict())
    except Exception as error:  # pyhocon raises its own and pyparsing's exceptions
        raise UserError(f"plan {path} cannot be parsed: {error}") from None
    unknown = [k for k in values if k not in PLAN_KEYS]
    if unknown:
        raise UserError(f"plan {path}: unknown key(s): {', '.join(unknown)}. Valid keys: {', '.join(PLAN_KEYS)}")
    missing = [k for k, (_, required, _) in PLAN_KEYS.items() if required and k not in values]
    if missing:
        raise UserError(f"plan {path} lacks {', '.join(missing)}: "
                        + "; ".join(f"{k}: {PLAN_KEYS[k][2]}" for k in missing))
    checked = {k: _check_type(path, k, v, PLAN_KEYS[k][0]) for k, v in values.items() if PLAN_KEYS[k][0] is not dict}
    configs = []
    for config in checked["configs"]:
        resolved = config if os.path.isabs(config) else os.path.join(ROOT, config)
        if not os.path.isfile(resolved):
            raise UserError(f"plan {path}: config file {config!r} does not exist (relative paths are read from "
                            f"the repository root, {ROOT})")
        configs.append(resolved)
    from .slurm import slurm_settings

    slurm = dict(_check_type(path, "slurm", values.get("slurm", {}), dict))
    slurm_settings(slurm, f"plan {path}: slurm")
    variants = _check_variants(path, values.get("variants", {}))
    per_config = _check_per_config(path, values.get("per_config", {}), configs, dict(variants))
    return Plan(name=os.path.splitext(os.path.basename(path))[0], path=path,
                description=checked.get("description", ""), configs=tuple(configs), bits=checked["bits"],
                act_modes=checked["act_modes"], seeds=checked["seeds"], overrides=checked.get("set", ()),
                save_path=checked.get("save_path", DEFAULT_SAVE_PATH), slurm=slurm, variants=variants,
                per_config=per_config, baseline=checked.get("baseline", "baseline"))


def _string_list(path: str, where: str, value) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"plan {path}: {where} must be a list of strings, got {value!r}")
    return tuple(value)


def _check_variants(path: str, value) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(value, dict):
        raise UserError(f"plan {path}: variants must be a map of name = [key=value, ...], got {value!r}")
    for name in value:
        if not VARIANT_NAME.match(name):
            raise UserError(f"plan {path}: variant name {name!r} must be letters, digits, _ or -")
    return tuple((name, _string_list(path, f"variants.{name}", overrides)) for name, overrides in value.items())


def _check_per_config(path: str, value, configs, variants: dict):
    if not isinstance(value, dict):
        raise UserError(f"plan {path}: per_config must be a map of config name = {{variants = [...], set = [...]}}")
    stems = [os.path.splitext(os.path.basename(config))[0] for config in configs]
    groups = []
    for stem, group in value.items():
        if stem not in stems:
            raise UserError(f"plan {path}: per_config.{stem} names no config of the plan ({', '.join(stems)})")
        unknown = [key for key in (group if isinstance(group, dict) else {}) if key not in ("variants", "set")]
        if not isinstance(group, dict) or unknown:
            raise UserError(f"plan {path}: per_config.{stem} must be {{variants = [...], set = [...]}}")
        names = _string_list(path, f"per_config.{stem}.variants", group.get("variants", []))
        missing = [name for name in names if name not in variants]
        if missing:
            raise UserError(f"plan {path}: per_config.{stem}.variants names {', '.join(missing)}, not among the "
                            f"variants ({', '.join(variants) or 'none'})")
        groups.append((stem, names, _string_list(path, f"per_config.{stem}.set", group.get("set", []))))
    return tuple(groups)


def _check_overrides(overrides, where: str) -> None:
    for text in overrides:
        try:
            key, _ = parse_override(text)
        except ConfigError as error:
            raise UserError(f"{where}: {error}") from None
        if key in RESERVED_KEYS:
            raise UserError(f"{where}: {key} is set by each cell; {RESERVED_KEYS[key]}")


def expand_cells(plan: Plan, save_path: str, extra_overrides=(), gpu_index: bool = False) -> list[Cell]:
    """Every cell of ``plan``, its config loaded and checked as ``main.py`` would (so a typo in an
    override stops here, not in every cell). ``gpu_index`` adds ``GPU=0`` for runs pinned by
    CUDA_VISIBLE_DEVICES."""
    _check_overrides(plan.overrides, f"plan {plan.path}: set")
    _check_overrides(extra_overrides, "--set")
    for variant, overrides in plan.variants:
        _check_overrides(overrides, f"plan {plan.path}: variants.{variant}")
    groups = {stem: (names, overrides) for stem, names, overrides in plan.per_config}
    for stem, (_, overrides) in groups.items():
        _check_overrides(overrides, f"plan {plan.path}: per_config.{stem}.set")
    cells, names = [], {}
    for config, (variant, variant_overrides), bits, act_mode, seed in itertools.product(
            plan.configs, plan.variants or (("", ()),), plan.bits, plan.act_modes, plan.seeds):
        stem = os.path.splitext(os.path.basename(config))[0]
        chosen, config_overrides = groups.get(stem, ((), ()))
        if chosen and variant not in chosen:
            continue
        overrides = (*(() if act_mode == FROM_CONFIG else (f"act_mode={act_mode}",)), *plan.overrides,
                     *config_overrides, *variant_overrides, *extra_overrides, *(["GPU=0"] if gpu_index else []))
        label = (f"{stem}_W{bits}A{bits}" + ("" if act_mode == FROM_CONFIG else f"_{act_mode}")
                 + (f"_{variant}" if variant else "") + f"_id{seed}")
        try:
            options = load_options(config, overrides, qw=bits, qa=bits)
        except ConfigError as error:
            raise UserError(f"cell {label}: {error}") from None
        act_mode = options.act_mode
        name = f"{stem}_W{bits}A{bits}_{act_mode}" + (f"_{variant}" if variant else "") + f"_id{seed}"
        if name in names:
            raise UserError(f"plan {plan.path}: configs {names[name]} and {config} have the same file name, so "
                            f"their cells would share folders; rename one")
        names[name] = config
        folder = os.path.join(save_path, plan.name, name)
        overrides = (*overrides, f"save_path={folder}")
        folder_name = "ImageNet" if options.dataset == "imagenet" else "CIFAR"
        cells.append(Cell(name, config, bits, act_mode, seed, folder, os.path.join(ROOT, folder_name, "main.py"),
                          overrides, variant))
    return cells
