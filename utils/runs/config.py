"""The run's configuration read from a hocon file, ``--set key=value`` overrides and recipes, into the typed,
validated :class:`.options.Options`.

Keys keep the spellings of the official GranQ configs (``qw``, ``lr_S``, ``batchSize``) so that
published configs load unchanged. Unknown keys are rejected with the list of valid ones.

A network named by pytorchcv or torchvision fixes its dataset, class count and input size. Where the config
leaves ``dataset``, ``nClasses`` or ``img_size`` out they come from the name; ``dataset`` and ``nClasses``
that the config sets must agree with it, while ``img_size`` (the generated images' size) is taken as given
and checked when the teacher is built. A user's ``MODULE:FUNCTION`` model takes all three from the config.
"""

import dataclasses
import functools
import json
import logging
import os
import typing

from pyhocon import ConfigFactory

from ..models import get_model_spec
from ..system.errors import ConfigError, UserError
from .options import DATASET_CLASSES, GENERATORS, LEGACY_KEYS, Options

__all__ = ["DATASET_CLASSES", "GENERATORS", "LEGACY_KEYS", "Options", "RECIPES_DIR", "RENAMED_KEYS", "load_options",
           "load_recipe", "parse_override", "recipe_names"]

RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "recipes")
# Former name -> name of keys that were renamed; the former one is still read, with one warning.
RENAMED_KEYS = {"granq_impl": "quant_impl"}

_FIELD_TYPES = typing.get_type_hints(Options)
VALID_KEYS = tuple(f.name for f in dataclasses.fields(Options))


def _type_name(kind) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list[int]: "a list of integers", list[float]: "a list of numbers", list[str]: "a list of strings"}[kind]


def _coerce(key: str, value):
    """Check ``value`` against the declared type of ``key``; ints are accepted where floats are."""
    kind = _FIELD_TYPES[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool):
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    else:
        item = typing.get_args(kind)[0]
        ok = isinstance(value, list) and all(
            isinstance(v, (int, float) if item is float else item) and not isinstance(v, bool) for v in value)
        if ok and item is float:
            value = [float(v) for v in value]
    if not ok:
        raise ConfigError(f"{key} must be {_type_name(kind)}, got {value!r} ({type(value).__name__})")
    return value


def _check_known(keys) -> None:
    unknown = [k for k in keys if k not in VALID_KEYS]
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}. Valid keys: {', '.join(sorted(VALID_KEYS))}")


@functools.cache
def _current_key(key: str) -> str:
    """The current name of ``key``; a former one (:data:`RENAMED_KEYS`) warns, once per process."""
    if key in RENAMED_KEYS:
        logging.getLogger(__name__).warning("config key %s is deprecated: read as %s", key, RENAMED_KEYS[key])
    return RENAMED_KEYS.get(key, key)


def _current_keys(values: dict) -> dict:
    """``values`` under the current names of renamed keys; where both names are given the current one wins."""
    return {_current_key(key): value for key, value in sorted(values.items(), key=lambda kv: kv[0] not in RENAMED_KEYS)}


def parse_override(text: str) -> tuple[str, object]:
    """Parse one ``key=value`` override; the value is read according to the key's type.

    Strings are taken verbatim (paths and URLs need no quoting); numbers, booleans and lists are
    parsed as hocon/JSON values, so ``step_S=[100,200]`` and ``lr_S=1e-4`` work.
    """
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    key = _current_key(key)
    _check_known([key])
    kind = _FIELD_TYPES[key]
    if kind is str:
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
            raw = raw[1:-1]
        return key, raw
    try:
        value = json.loads(raw)
    except ValueError:
        try:
            value = ConfigFactory.parse_string(f"v = {raw}")["v"]
        except Exception:  # pyhocon raises its own and pyparsing's exceptions
            raise ConfigError(f"{key} must be {_type_name(kind)}, got {raw!r}") from None
    return key, _coerce(key, value)


def _read_hocon(path: str, what: str) -> dict:
    try:
        tree = ConfigFactory.parse_file(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path!r} does not exist") from None
    except Exception as error:  # pyhocon raises its own and pyparsing's exceptions
        raise ConfigError(f"{what} {path!r} cannot be parsed: {error}") from None
    values = _current_keys(dict(tree.as_plain_ordered_dict()))
    _check_known(values)
    return {key: _coerce(key, value) for key, value in values.items()}


def recipe_names() -> list[str]:
    """The recipes in ``recipes/``, by name."""
    if not os.path.isdir(RECIPES_DIR):
        return []
    return sorted(name[:-len(".hocon")] for name in os.listdir(RECIPES_DIR) if name.endswith(".hocon"))


def load_recipe(name: str) -> dict:
    """The keys of recipe ``name``: ``recipes/NAME.hocon``, or a hocon file at the path ``name``."""
    path = name if name.endswith(".hocon") else os.path.join(RECIPES_DIR, f"{name}.hocon")
    if not os.path.isfile(path):
        raise ConfigError(f"recipe = {name!r}: no such recipe; choose from: {', '.join(recipe_names())} "
                          f"(recipes/NAME.hocon), or give the path of a .hocon file")
    values = _read_hocon(path, "recipe file")
    if "recipe" in values:
        raise ConfigError(f"recipe file {path!r} sets recipe itself; a recipe cannot name another")
    return values


def load_options(conf_path: str, overrides: typing.Iterable[str] = (), **explicit) -> Options:
    """Read ``conf_path``, apply ``--set`` overrides, then ``explicit`` values that are not None.

    ``recipe = NAME`` adds the keys of :func:`load_recipe`. Named by ``--set`` (or ``explicit``), a recipe is a method
    applied to the config: its keys replace the config file's, and the other overrides still win; the dataset
    configs' values for the keys a recipe leaves out stay. Named in the file, its keys go beneath the file's own,
    so that a resolved ``config.hocon`` (which records the recipe's name with every value) loads to the same options.
    """
    file_values = _read_hocon(conf_path, "config file")
    given = dict(parse_override(text) for text in overrides)
    given.update({key: _coerce(key, value) for key, value in explicit.items() if value is not None})
    recipe = given.get("recipe", file_values.get("recipe", ""))
    recipe_values = load_recipe(recipe) if recipe else {}
    below, above = (file_values, recipe_values) if "recipe" in given else (recipe_values, file_values)
    values = {**below, **above, **given}
    return Options(**_network_defaults(values)).validate()


def _network_defaults(values: dict) -> dict:
    """``values`` with ``dataset``, ``nClasses`` and ``img_size`` from the network's name where they are absent."""
    try:
        spec = get_model_spec(values.get("network", Options.network))
    except UserError:
        return values  # validate() names the problem
    defaults = {"dataset": spec.dataset, "nClasses": spec.num_classes, "img_size": spec.image_size}
    return {**{key: value for key, value in defaults.items() if value is not None}, **values}


def options_from_dict(values: dict) -> Options:
    """Rebuild validated options from :meth:`Options.to_dict` output (e.g. a checkpoint)."""
    values = _current_keys(values)
    _check_known(values)
    return Options(**{key: _coerce(key, value) for key, value in values.items()}).validate()
