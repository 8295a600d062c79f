"""ml-collections configs: load a config file, apply `--config.KEY=VALUE` (or `--config.KEY VALUE`)
overrides, check keys.

A config file is a Python file with `get_config()` returning a `ml_collections.ConfigDict`.
Overrides name existing keys only; a wrong or misspelt key is a `ConfigError` naming it.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from alignx_jax.errors import ConfigError


def load_config_file(
    path: str, check: Callable[[ml_collections.ConfigDict], None] | None = None
) -> ml_collections.ConfigDict:
    """Import `path` (optionally `path:arg`) and call its `get_config([arg])`; `check(cfg)`'s ConfigError
    on what it returned names the file."""
    arg = None
    if ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"alignx_config_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:  # Python imports .py files only: a .json or .yaml gives no loader
        raise ConfigError(f"{path}: not a Python config file (a .py file that defines get_config())")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:  # a broken config file is the user's to fix: say where
        raise ConfigError(f"{path}: cannot load config: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    try:
        cfg = module.get_config(arg) if arg is not None else module.get_config()
    except Exception as e:  # `file.py:arg` the file takes no or another argument; or the file's own error
        said = f"with {arg!r}" if arg is not None else "without an argument"
        raise ConfigError(f"{path}: get_config() {said} failed: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    if check is not None:
        try:
            check(cfg)
        except ConfigError as e:  # a key the file left out is the file's to fix: say which file
            raise ConfigError(f"{path}: {e}") from None
    return cfg


def _parse_value(raw: str, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--config.{key}: expected a boolean, got {raw!r}")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected an integer, got {raw!r}") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected a number, got {raw!r}") from None
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    names = isinstance(current, (tuple, list)) and bool(current) and all(isinstance(v, str) for v in current)
    if names and isinstance(value, str):
        # a list of names given bare (q_proj,v_proj or q_proj v_proj), which a Python literal would quote
        return type(current)(p for p in re.split(r"[\s,]+", value.strip().strip("()[]")) if p)
    if isinstance(current, (tuple, list)) and isinstance(value, list):
        value = type(current)(value)
    if isinstance(current, (tuple, list)) and not isinstance(value, (tuple, list)) and value is not None:
        return _one_item_or_refused(raw, value, current, key)
    return value


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _one_item_or_refused(raw: str, value: Any, current: Sequence, key: str) -> Any:
    """A list-valued key given one value that is no list: a bare number of a key of numbers is its one
    item; numbers among which nan or inf is spelt out (no Python literal) are that list, for the config
    check to refuse with its finite-number line; anything else (`256 512` for `256,512`) one ConfigError
    naming the key and the form it takes, not ml_collections' "cannot be casted to type <class 'tuple'>"."""
    if current and all(map(_number, current)):
        if _number(value):
            return type(current)([value])
        kind = "integers" if all(isinstance(v, int) for v in current) else "numbers"
        spelt = _numbers_naming_non_finite(raw) if kind == "numbers" else None
        if spelt is not None:
            return type(current)(spelt)
        like = ",".join(map(str, current))
        raise ConfigError(f"--config.{key}: expected comma-separated {kind} like {like}, got {raw!r}")
    raise ConfigError(f"--config.{key}: expected a tuple written as a Python literal, got {raw!r}")


_NON_FINITE = ("nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity")


def _numbers_naming_non_finite(raw: str) -> list[float] | None:
    """`1,1,nan` or `(1.0, inf, 1.0)`: comma-separated numbers with nan or inf spelt as such among them,
    as floats; None for any other text."""
    items = [p.strip() for p in raw.strip().strip("()[]").split(",")]
    if not any(p.lower() in _NON_FINITE for p in items):
        return None
    out = []
    for p in items:
        if p.lower() in _NON_FINITE:
            out.append(float(p))
            continue
        try:
            v = ast.literal_eval(p)
        except (ValueError, SyntaxError):
            return None
        if not _number(v):
            return None
        out.append(float(v))
    return out


def _join_values(argv: Sequence[str], is_override) -> list[tuple[bool, str]]:
    """(is an override, text) per argument, in order, with `--config.KEY VALUE` joined into
    `--config.KEY=VALUE`: a `--config.KEY` without `=` takes the next argument as its value unless
    that starts with `--`; with no value either way it is a ConfigError naming the key."""
    out: list[tuple[bool, str]] = []
    i = 0
    while i < len(argv):
        item = argv[i]
        if is_override(item) and "=" not in item:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                item, i = f"{item}={argv[i + 1]}", i + 1
            else:
                key = item[2:] if item.startswith("--") else item
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
        out.append((is_override(item), item))
        i += 1
    return out


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Command-line arguments -> (overrides as `--config.KEY=VALUE` strings, the other arguments)."""
    joined = _join_values(argv, lambda a: a.startswith("--config."))
    return [a for o, a in joined if o], [a for o, a in joined if not o]


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply `--config.a.b=value` (or `config.a.b=value`, or `--config.a.b` `value` as two items) in order."""
    for _, item in _join_values(overrides, lambda a: a.startswith(("--config.", "config."))):
        text = item[2:] if item.startswith("--") else item
        if not text.startswith("config."):
            raise ConfigError(f"unrecognized argument {item!r} (overrides look like --config.train.steps=30)")
        key, raw = text[len("config.") :].split("=", 1)
        parts = key.split(".")
        node = cfg
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                name = ".".join(parts[: depth + 1])
                raise ConfigError(f"unknown config key {name!r} in --config.{key}{did_you_mean(cfg, name)}")
            node = node[part]
        leaf = parts[-1]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ConfigError(f"unknown config key {key!r} in --config.{key}{did_you_mean(cfg, key)}")
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key} names a section, not a value")
        value = _parse_value(raw, current, key)
        try:
            with node.unlocked() if hasattr(node, "unlocked") else _null():
                node[leaf] = value
        except (TypeError, KeyError) as e:
            raise ConfigError(f"--config.{key}={raw}: {e}") from None
    return cfg


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key of a nested ConfigDict (sections and values) as a dotted name."""
    if not isinstance(node, ml_collections.ConfigDict):
        return []
    out = []
    for k in node:
        out += [prefix + k, *_dotted_keys(node[k], f"{prefix}{k}.")]
    return out


def did_you_mean(cfg: ml_collections.ConfigDict, name: str) -> str:
    """' (did you mean KEY?)' naming the config key nearest to the unknown dotted `name` (a one-letter
    typo, or the right name in another section: train.lr -> optim.lr); '' when none is near."""
    known = [k for k in _dotted_keys(cfg) if k != name and not k.startswith(name + ".")]  # not itself
    *parents, leaf = name.split(".")
    depth = len(parents)
    siblings = [k for k in known if k.count(".") == depth and k.rsplit(".", 1)[0] == ".".join(parents)]
    near = difflib.get_close_matches(name, siblings, n=1, cutoff=0.8) if parents else []
    near = near or difflib.get_close_matches(
        name, [k for k in known if k.count(".") == depth], n=1, cutoff=0.8
    )
    near = near or [k for k in known if k.rsplit(".", 1)[-1] == leaf][:1]
    return f" (did you mean {near[0]}?)" if near else ""


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# the keys that name a file or folder: a leading `~` in them is the user's home, as a shell would expand it
PATH_KEYS = ("workdir", "data.train", "data.eval", "model.hf_path", "model.tokenizer")


def expand_home(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`~/x` or `~user/x` in the `PATH_KEYS` as that home's x (URLs, presets and hub ids start otherwise):
    a shell leaves `--config.workdir=~/x` as written (a `~` after `=`), and a run made a `./~/x` folder."""
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        value = node.get(leaf) if isinstance(node, ml_collections.ConfigDict) else None
        if isinstance(value, str) and value.startswith("~"):
            node[leaf] = os.path.expanduser(value)
    return cfg


def load_config(
    path: str,
    overrides: Sequence[str] = (),
    check: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> ml_collections.ConfigDict:
    """Load a config file (`check`: `load_config_file`'s), apply overrides, expand `~` in its paths and
    lock it so that later typos fail loudly."""
    cfg = load_config_file(path, check)
    cfg = expand_home(apply_overrides(cfg, overrides))
    cfg.lock()
    return cfg


def config_to_json(cfg: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (written to W/config.json)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
