"""Build a `Config` from YAML files and `--set a.b=c` overrides, strictly.

Later files override earlier ones key by key; `--set` overrides come last and
their values are parsed as YAML scalars (`--set train.iters=20`,
`--set model.rope_scaling={rope_type: linear, factor: 2}`). Every error is a
`ConfigError` naming where the value came from (file or `--set`), the dotted
key and the value, with a did-you-mean for misspelt keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

from .schema import Config


class ConfigError(ValueError):
    """A configuration problem; the message says where, which key and how to fix it."""


def _suggest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, key)
    if tp is Any:
        return value
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: key '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], where, key) for v in value] if args else list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _apply(obj: Any, data: Dict[str, Any], where: str, prefix: str = "") -> None:
    """Set fields of dataclass `obj` from nested dict `data`, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields or (prefix == "" and key == "derived"):
            valid = [k for k in fields if k != "derived"]
            raise ConfigError(
                f"{where}: unknown key '{dotted}'{_suggest(str(key), valid)}; "
                f"valid keys here: {', '.join(valid)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, where, dotted + ".")
        elif isinstance(current, dict) and isinstance(value, dict) and key == "deepspeed":
            current.update(value)
        else:
            setattr(obj, key, _coerce(value, hints[key], where, dotted))


SET_HELP = ("override config keys: --set a.b=1 c.d=2 (several pairs after one flag) or a repeated --set; "
            "values are YAML")


def add_set_argument(parser) -> None:
    """Add the shared `--set KEY=VALUE [KEY=VALUE ...]` option (repeatable) to an argparse parser.

    Every use lands flattened, in command-line order, in `args.overrides` (a list of 'a.b=c' strings).
    """
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help=SET_HELP)


def parse_override(text: str) -> Tuple[List[str], Any]:
    """Split `a.b.c=value` into (['a','b','c'], yaml-parsed value)."""
    if "=" not in text:
        hint = (" (config files go before --set: `CONFIG.yml --set a=1 b=2`)"
                if text.endswith((".yml", ".yaml")) else "")
        raise ConfigError(f"--set {text!r}: expected the form section.key=value, e.g. train.iters=20{hint}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from None
    return key.strip().split("."), value


def _nest(path: Sequence[str], value: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    cur = out
    for p in path[:-1]:
        cur = cur.setdefault(p, {})
    cur[path[-1]] = value
    return out


def read_yaml(path: str) -> Dict[str, Any]:
    """Read one YAML config file into a dict, with a clear error on bad syntax or a missing file."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(paths: Sequence[str] = (), overrides: Sequence[str] = (),
                world_size: Optional[int] = None, validate: bool = True) -> Config:
    """Build and validate a Config.

    Args:
      paths: YAML files, merged in order (later override earlier).
      overrides: `a.b=c` strings applied last.
      world_size: total number of ranks; None = launcher.num_gpus * launcher.num_nodes.
      validate: run checks and compute `derived` (megatron.config.derive).
    """
    cfg = Config()
    for path in paths:
        _apply(cfg, read_yaml(path), path)
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value), f"--set {text}")
    if validate:
        from .derive import derive_and_validate
        derive_and_validate(cfg, world_size)
    return cfg


def config_to_dict(cfg: Config, include_derived: bool = True) -> Dict[str, Any]:
    """Plain nested dict of the config (what `dump_config` writes)."""
    out = dataclasses.asdict(cfg)
    if not include_derived:
        out.pop("derived", None)
    return out


def dump_config(cfg: Config, path: Optional[str] = None) -> str:
    """Serialise the resolved config to YAML (derived values included, under `derived:`)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if path is not None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    return text


def config_from_dict(data: Dict[str, Any], where: str = "<dict>") -> Config:
    """Inverse of `config_to_dict`: rebuild a Config, derived values included, without revalidating."""
    data = dict(data)
    derived = data.pop("derived", None)
    cfg = Config()
    _apply(cfg, data, where)
    if derived:
        _apply(cfg.derived, derived, where, "derived.")
    return cfg


def load_dumped_config(path: str) -> Config:
    """Load a YAML written by `dump_config` back into an equal Config."""
    return config_from_dict(read_yaml(path), path)
