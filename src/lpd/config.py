"""Loading experiment configs and applying command-line overrides.

A config file is a Python module with ``get_config(arg=None)`` returning a
locked ``ml_collections.ConfigDict``. It is named on the command line as
``path/to/file.py`` or ``path/to/file.py:arg``; overrides look like
``--config.archive.num_iterations=20``.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from lpd.errors import LpdError

PACKAGED = Path(__file__).parent / "configs"  # experiments/configs in a clone.


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``file.py[:arg]`` and applies ``--config.a.b=value`` overrides.

    A bare name (``tiny.py``, ``default.py:hopper_uni``) that is not a file
    here is one of the configs shipped in the package (:data:`PACKAGED`), so
    an installed lpd finds them without a clone.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path) and (PACKAGED / path).is_file():
        path = str(PACKAGED / path)
    if not os.path.isfile(path):
        shipped = ", ".join(sorted(p.name for p in PACKAGED.glob("*.py")))
        raise LpdError(f"config file not found: {path} (shipped configs: {shipped})")
    module_spec = importlib.util.spec_from_file_location("_lpd_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # A user's config file can fail in any way.
        raise LpdError(f"config file {path} failed to load: {e}") from e
    if not hasattr(module, "get_config"):
        raise LpdError(f"config file {path} has no get_config() function")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:
        raise LpdError(f"config {spec} failed to load: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise LpdError(
            f"get_config() in {path} returned a {type(config).__name__}; it must "
            "return an ml_collections.ConfigDict"
        )
    config.lock()
    for override in overrides:
        apply_override(config, override)
    check_values(config)
    return config


MAX_SEED = 2**32 - 1


def check_seed(seed, name: str = "--seed") -> int:
    """``seed`` if it is an integer in ``[0, 2**32 - 1]``; else a one-line error."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise LpdError(f"{name} must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return seed


def check_values(config: ml_collections.ConfigDict, prefix: str = "config") -> None:
    """Refuses NaN or infinite numbers anywhere in ``config``, and a bad seed."""
    for name, value in config.items():
        where = f"{prefix}.{name}"
        if isinstance(value, ml_collections.ConfigDict):
            check_values(value, where)
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise LpdError(f"{where} is {v}; give a finite number")
    if prefix == "config" and "seed" in config:
        check_seed(config.seed, "config.seed")


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Applies one ``--config.a.b=value`` (or ``config.a.b=value``) override."""
    text = override.removeprefix("--")
    if not text.startswith("config.") or "=" not in text:
        raise LpdError(f"bad override {override!r}: expected --config.a.b=value")
    dotted, _, raw = text[len("config.") :].partition("=")
    *parents, leaf = dotted.split(".")
    node = config
    for depth, name in enumerate(parents):
        _check_field(node, name, parents[:depth])
        node = node[name]
        if not isinstance(node, ml_collections.ConfigDict):
            raise LpdError(f"config.{'.'.join(parents[: depth + 1])} is not a group")
    _check_field(node, leaf, parents)
    old = node[leaf]
    if isinstance(old, ml_collections.ConfigDict):
        raise LpdError(f"config.{dotted} is a group; override one of its fields")
    try:
        node[leaf] = _parse_value(raw, old, dotted)
    except TypeError as e:  # A typed placeholder (unset field) refused the value.
        raise LpdError(f"config.{dotted}={raw!r}: {e}") from None


def _check_field(node: ml_collections.ConfigDict, name: str, parents: list) -> None:
    """Raises an error naming the closest field when ``name`` is not in ``node``."""
    if name in node:
        return
    where = ".".join(["config"] + list(parents))
    hint = difflib.get_close_matches(name, list(node.keys()), n=1)
    maybe = f"; did you mean {hint[0]!r}?" if hint else ""
    raise LpdError(f"unknown config field {name!r} in {where}{maybe}")


def _parse_value(raw: str, old: Any, dotted: str) -> Any:
    """Parses ``raw`` into the type of the value it replaces."""
    if isinstance(old, str):
        return raw
    if old is None:  # An unset field: a Python literal, else the string.
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    try:
        if isinstance(old, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if isinstance(old, int):
            return int(raw)
        if isinstance(old, float):
            return float(raw)
        value = ast.literal_eval(raw)
        if isinstance(old, tuple):
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        return value
    except (ValueError, SyntaxError):
        kind = type(old).__name__
        raise LpdError(f"config.{dotted}={raw!r} is not a valid {kind}") from None


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """A JSON-compatible dict (tuples become lists) of ``config``."""
    return json.loads(config.to_json())


# A settings group added later that only an option added with it reads
# (``archive.dcrl`` is read with ``emitter="dcrl_me"`` only): a stage made
# before it existed matches any value of it.
UNUSED = object()

# Fields added after workdirs were made with earlier versions, and the value
# that gives the behaviour from before each field existed: a stage whose
# config.json lacks one of them was made with that value.
ADDED_FIELDS = {
    "archive.dcrl": UNUSED,
    "archive.num_ancestors": 0,
    "archive.reeval_episodes": 8,
    "archive.scoring_episodes": 1,
    "codec.obs_episodes": 0,
    "codec.visit_period": 0,
    "diffusion.return_neighbours": 0,
    "diffusion.return_source": "stored",
    "diffusion.cond_frequencies": 0,
}


def diff_configs(old: dict, new: dict, prefix: str = "config") -> list[str]:
    """Dotted paths where two config dicts differ, with both values.

    A field of :data:`ADDED_FIELDS` missing from ``old`` counts as its value
    from before it existed.
    """
    diffs = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}.{key}"
        a, b = old.get(key), new.get(key)
        if key not in old and path.removeprefix("config.") in ADDED_FIELDS:
            a = ADDED_FIELDS[path.removeprefix("config.")]
            if a is UNUSED:
                continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += diff_configs(a, b, path)
        elif a != b:
            diffs.append(f"{path}: {a!r} -> {b!r}")
    return diffs
