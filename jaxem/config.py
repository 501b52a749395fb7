"""Load an experiment config, apply command-line overrides, validate, freeze.

A config is an `ml_collections.ConfigDict` returned by `get_config(arg)` in a Python file under
`configs/`. The command line names it as `--config FILE[:ARG]` and overrides any existing field
with dotted flags such as `--config.train.steps=50`. Unknown keys and values of the wrong type are
`UserError`s: one sentence naming the field and what was expected.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from jaxem.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
OVERRIDE_PREFIX = "--config."


def resolve_config_path(name: str) -> Path:
    """Maps `demo`, `demo.py` or a path to the config file; names resolve inside `configs/`."""
    path = Path(name)
    if path.suffix != ".py":
        path = path.with_suffix(".py")
    if not path.exists() and (CONFIG_DIR / path.name).exists():
        path = CONFIG_DIR / path.name
    return path


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `FILE[:ARG]` by calling `get_config(ARG)` (or `get_config()` without ARG)."""
    name, _, arg = spec.partition(":")
    path = resolve_config_path(name)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist (expected a Python file with get_config()).")
    module_spec = importlib.util.spec_from_file_location(f"jaxem_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the config file itself is user input
        raise UserError(f"config file {path} could not be read: {type(e).__name__}: {e}.") from e
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path} has no get_config() function.")
    try:
        cfg = module.get_config(arg) if arg else module.get_config()
    except UserError:
        raise
    except Exception as e:  # e.g. an argument the config does not know
        raise UserError(f"get_config({arg!r}) in {path} failed: {type(e).__name__}: {e}") from e
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise UserError(f"get_config() in {path} returned {type(cfg).__name__}, expected an ml_collections.ConfigDict.")
    cfg.lock()
    return cfg


def config_args(arg: str, allowed: Sequence[str], name: str, one_of: Sequence[str] = ()) -> set[str]:
    """The comma-separated arguments of `configs/NAME.py:ARG` as a set; UserError naming any
    argument not in `allowed`, or more than one of the mutually exclusive `one_of`."""
    options = {a.strip() for a in arg.split(",") if a.strip()}
    unknown = options - set(allowed)
    if unknown:
        raise UserError(f"configs/{name}.py does not know argument(s) {', '.join(sorted(unknown))}; "
                        f"use any of {', '.join(allowed)}, comma-separated.")
    if len(options & set(one_of)) > 1:
        raise UserError(f"configs/{name}.py takes only one of {', '.join(one_of)}, got {', '.join(sorted(options & set(one_of)))}.")
    return options


def parse_value(text: str, current: Any, key: str) -> Any:
    """Converts override text to the type of the field's current value."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise UserError(f"config field {key} expects true or false, got {text!r}.")
    if isinstance(current, str) or current is None:
        return text if current is not None or not _looks_literal(text) else ast.literal_eval(text)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(f"config field {key} expects {_type_name(current)}, got {text!r}.") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(current)(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (int, float)):
        return type(current)([value])
    if type(value) is not type(current):
        raise UserError(f"config field {key} expects {_type_name(current)}, got {text!r}.")
    return value


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", tuple: "a tuple such as (1, 2)",
              list: "a list such as [1, 2]", dict: "a dict"}


def _type_name(value: Any) -> str:
    return TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


def _looks_literal(text: str) -> bool:
    try:
        ast.literal_eval(text)
        return True
    except (ValueError, SyntaxError):
        return False


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=value` (or `--config.a.b value`) overrides to a copy of `cfg`."""
    cfg = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)
    pairs = _override_pairs(overrides)
    for key, text in pairs:
        parent, leaf = _walk(cfg, key)
        current = parent[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise UserError(f"config field {key} is a section; override one of its fields ({', '.join(sorted(current.keys()))}).")
        parent[leaf] = parse_value(text, current, key)
    cfg.lock()
    return cfg


def _override_pairs(overrides: Sequence[str]) -> list[tuple[str, str]]:
    pairs, items, i = [], list(overrides), 0
    while i < len(items):
        item = items[i]
        if not item.startswith(OVERRIDE_PREFIX):
            raise UserError(f"unexpected argument {item!r} (overrides look like --config.train.steps=50).")
        body = item[len(OVERRIDE_PREFIX):]
        if "=" in body:
            key, text = body.split("=", 1)
        elif i + 1 < len(items):
            key, text = body, items[i + 1]
            i += 1
        else:
            raise UserError(f"override {item} has no value (write {item}=VALUE).")
        pairs.append((key, text))
        i += 1
    return pairs


def _walk(cfg: ml_collections.ConfigDict, key: str):
    parts = key.split(".")
    node = cfg
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:depth]) or "the config"
            choices = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise UserError(f"unknown config key {key!r}: {where} has no field {part!r} (fields: {', '.join(choices)}).")
        if depth == len(parts) - 1:
            return node, part
        node = node[part]
    raise AssertionError("unreachable")


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """The resolved config as stable, sorted JSON."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def save_config(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Path:
    """Writes the resolved config to `workdir/config.json` and returns that path."""
    path = Path(workdir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(cfg) + "\n")
    return path


def load_saved_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """Reads the config a run saved in its workdir."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist: {workdir} is not a jaxem run directory.")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def config_differences(saved: dict | ml_collections.ConfigDict, wanted: ml_collections.ConfigDict,
                       ignore: tuple[str, ...] = (), shared_only: bool = False) -> dict[str, tuple]:
    """{"section.field": (saved value, wanted value)} for every leaf where a run's saved config
    (config.json's dict, or a ConfigDict) and `wanted` differ, compared as JSON (tuples and lists
    alike); a leaf only one has shows None on the other side, unless `shared_only` (then only
    leaves both have are compared: e.g. a field added to jaxem after the run was trained). Keys in
    `ignore` (dotted) are skipped."""
    def leaves(tree, prefix=""):
        if isinstance(tree, dict):
            for key, value in tree.items():
                yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1], tree

    def as_json(cfg):
        return json.loads(to_json(cfg)) if isinstance(cfg, ml_collections.ConfigDict) else cfg

    old, new = dict(leaves(as_json(saved))), dict(leaves(as_json(wanted)))
    keys = old.keys() & new.keys() if shared_only else old.keys() | new.keys()
    return {key: (old.get(key), new.get(key)) for key in sorted(keys)
            if key not in ignore and old.get(key) != new.get(key)}


def fingerprint(section: ml_collections.ConfigDict) -> str:
    """A short hash of one config section, e.g. the model, to detect incompatible workdirs."""
    text = json.dumps(section.to_dict(), sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
