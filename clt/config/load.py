"""Reading configs: a `get_config()` file, `key=value` overrides, presets, then the field groups of schema.py.

A config file returns an `ml_collections.ConfigDict` (the big_vision convention). It is read once, turned
into plain Python, overridden from the command line (MaxText style: positional dotted `key=value` after the
config path), then built into the frozen dataclasses of clt/config/schema.py and checked. Nothing reads the
raw ConfigDict after that, so a misspelt key can never silently fall back to a default: unknown keys are
errors with a suggestion.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import pathlib
import types
import typing
from typing import Any

from clt.config.schema import (
    REPO_ROOT,
    BudgetConfig,
    Config,
    ConfigError,
    DataConfig,
    PhaseConfig,
    ReplayConfig,
    UpsampleConfig,
    WandbConfig,
    config_fields,
    did_you_mean,
    normalise_mixture,
    parse_count,
)


# ----------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with types checked and unknown keys rejected.
# ----------------------------------------------------------------------------------------------------------
def preset_names(kind: str) -> list[str]:
    """The presets of `kind` ("schedules" or "replay"): one file each in that folder of the repository."""
    return sorted(p.stem for p in (REPO_ROOT / kind).glob("*.py"))


def _resolve_preset(kind: str, name: str, path: str) -> dict:
    """Load `schedules/NAME.py` or `replay/NAME.py` (a get_config() returning a dict)."""
    file = REPO_ROOT / kind / f"{name}.py"
    if not file.exists():
        names = preset_names(kind)
        raise ConfigError(path, name, f"unknown {kind[:-1] if kind.endswith('s') else kind} preset",
                          f"{did_you_mean(name, names)} (presets live in {kind}/)")
    return dict(_load_module(file, path).get_config())


def _load_module(file: pathlib.Path, path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"clt_cfg_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a broken config file is the user's error, shown in one line
        raise ConfigError(path, str(file), f"cannot load: {type(e).__name__}: {e}", "fix the file") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(path, str(file), "has no get_config()", "define get_config() returning the config")
    return module


def _with_preset(kind: str, raw: Any, path: str) -> Any:
    """A preset name, or a dict naming a `preset` whose values its other keys override, as a plain dict; any
    other value unchanged (the typed builder judges it)."""
    if isinstance(raw, str):
        return _resolve_preset(kind, raw, path)
    if isinstance(raw, dict) and "preset" in raw:
        base = _resolve_preset(kind, raw["preset"], f"{path}.preset")
        return {**base, **{k: v for k, v in raw.items() if k != "preset"}}
    return raw


def _schedule_dict(raw: Any, path: str) -> Any:
    return _with_preset("schedules", raw, path)


def _replay_dict(raw: Any, path: str) -> Any:
    if isinstance(raw, bool):
        raise ConfigError(path, raw, "replay is a share, a preset name or a dict", "write e.g. replay=0.25")
    if isinstance(raw, (int, float)):
        return {"share": raw}
    return _with_preset("replay", raw, path)


_PRE = {  # field-specific conversions applied before generic typing
    (PhaseConfig, "schedule"): _schedule_dict,
    (PhaseConfig, "replay"): _replay_dict,
    (PhaseConfig, "tokens"): lambda v, p: None if v is None else parse_count(v, p),
    (PhaseConfig, "mixture"): normalise_mixture,
    (UpsampleConfig, "mixture"): normalise_mixture,
    (ReplayConfig, "weights"): lambda v, p: () if not v else normalise_mixture(v, p),
    (BudgetConfig, "tokens"): lambda v, p: None if v is None else parse_count(v, p),
    (BudgetConfig, "steps"): lambda v, p: None if v is None else parse_count(v, p),
    (DataConfig, "domains"): lambda v, p: _domains(v, p),
    (WandbConfig, "tags"): lambda v, p: (v,) if isinstance(v, str) else v,  # log.wandb.tags=baseline: one tag
}


def _domains(raw: Any, path: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict):
        raise ConfigError(path, raw, "domains is a dict of name -> prepared folder",
                          'write {"prose": "data/demo/prose"}')
    return tuple((str(k), str(v)) for k, v in raw.items())


def build(cls: type, raw: Any, path: str) -> Any:
    """Plain dict -> dataclass `cls`, recursively; unknown keys and wrong types are ConfigErrors."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(path, raw, f"expected a dict for {cls.__name__}", "see the README's config section")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in config_fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        sub = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(sub, value, "unknown field", did_you_mean(key, names))
        pre = _PRE.get((cls, key))
        if pre is not None:
            value = pre(value, sub)
        kwargs[key] = _convert(hints[key], value, sub)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, value, "expected True or False", "write True or False")
        return value
    if tp is int:
        if isinstance(value, float) and value == int(value):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, value, "expected an integer", "write a whole number")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, value, "expected a number", "write e.g. 0.1")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, value, "expected a string", "quote the value")
        return value
    if origin is tuple:
        if isinstance(value, tuple) and all(isinstance(v, tuple) for v in value):
            return value  # already-normalised pairs (mixtures, domains)
        if isinstance(value, (list, tuple)):
            elem = args[0]
            return tuple(_convert(elem, v, f"{path}.{i}") for i, v in enumerate(value))
        raise ConfigError(path, value, "expected a tuple", "write (a, b, ...)")
    return value


# ----------------------------------------------------------------------------------------------------------
# Loading and overrides.
# ----------------------------------------------------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """ConfigDict / FrozenConfigDict / lists -> plain dicts and tuples."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return tuple(_plain(v) for v in obj)
    return obj


def parse_value(text: str) -> Any:
    """Command-line value: a Python literal when it parses as one, else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply `a.b.c=value` overrides to a plain config dict; phases addressable by name or index."""
    seen: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, item, "an override is key=value", "write e.g. batch_size=16")
        key, text = item.split("=", 1)
        key = key.strip()
        if key in seen:
            raise ConfigError(key, text, f"overridden twice (already {seen[key]!r})", "give each key once")
        seen[key] = text
        _set_path(raw, key.split("."), parse_value(text), key)
    return raw


def _set_path(node: Any, parts: list[str], value: Any, full: str) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(node, tuple):
        raise ConfigError(full, value, "internal: tuple node", "")
    if head == "phases" and rest:
        phases = list(node.get("phases", ()))
        sel = rest[0]
        idx = next((i for i, p in enumerate(phases) if p.get("name") == sel), None)
        if idx is None and sel.lstrip("-").isdigit() and -len(phases) <= int(sel) < len(phases):
            idx = int(sel) % len(phases)
        if idx is None:
            names = [p.get("name", str(i)) for i, p in enumerate(phases)]
            raise ConfigError(full, value, f"no phase {sel!r}", f"phases are {names} (or an index)")
        if len(rest) == 1:
            phases[idx] = value
        else:
            phase = dict(phases[idx])
            _set_path(phase, rest[1:], value, full)
            phases[idx] = phase
        node["phases"] = tuple(phases)
        return
    if not rest:
        node[head] = value
        return
    child = node.get(head)
    if child is None:
        child = {}
    elif isinstance(child, str) and head in ("schedule", "replay"):
        child = {"preset": child}  # override a field of a preset by name
    elif isinstance(child, (int, float)) and head == "replay":
        child = {"share": child}
    if not isinstance(child, dict):
        raise ConfigError(full, value, f"{head!r} is not a group of fields", f"set {head}=... directly")
    child = dict(child)
    _set_path(child, rest, value, full)
    node[head] = child


def load_raw(path: str) -> dict:
    """The config file's get_config() as plain data; a path that is not a Python file is a ConfigError."""
    file = pathlib.Path(path)
    example = "give the path of a get_config() file, e.g. configs/demo.py"
    if not file.exists():
        raise ConfigError("config", path, "no such file", example)
    if file.is_dir():
        inside = sorted(str(p) for p in file.glob("*.py"))[:3]
        raise ConfigError("config", path, "is a folder, not a config file",
                          f"give one of the files in it, e.g. {', '.join(inside)}" if inside else example)
    if file.suffix != ".py":
        raise ConfigError("config", path, "is not a Python (.py) file", example)
    return _plain(_load_module(file, "config").get_config())


def load(path: str, overrides: typing.Sequence[str] = ()) -> Config:
    """Load, override and validate a config file; raises ConfigError."""
    return from_dict(apply_overrides(load_raw(path), overrides))


def from_dict(raw: dict) -> Config:
    """Build and validate a Config from plain data (what `load` does after reading the file)."""
    cfg = build(Config, raw, "")
    cfg.check()
    return cfg
