"""Load a ``RunConfig`` from YAML + ``key.sub=value`` overrides; generate ``--help``.

Values are parsed by the field's declared type (bool, int, float, str, ``Literal`` enums,
``X | None``, ``tuple[X, ...]``, nested sections). Unknown keys are errors naming the
nearest valid key; bad values are errors naming key and value. All of this happens before
anything is compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from topd_jax.config.schema import ConfigError, RunConfig

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
_NONE = {"none", "null", "~", ""}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def leaf_keys(cls: type = RunConfig, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every settable dotted key -> (type, field), in declaration order."""
    out: dict[str, tuple[Any, dataclasses.Field]] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if _is_section(tp):
            out.update(leaf_keys(tp, key + "."))
        else:
            out[key] = (tp, f)
    return out


def _nearest(key: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
    tail = [c for c in candidates if c.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    best = tail[0] if len(tail) == 1 else close[0]
    return f"did you mean '{best}'?"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return f"tuple[{_type_name(args[0])}, ...]"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, tp: Any, value: Any) -> Any:
    """Convert a YAML value or a command-line string to ``tp``; ConfigError if impossible."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        assert len(inner) == 1, f"unsupported union type for {key}: {tp}"
        return coerce(key, inner[0], value)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, args))}")
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip().removeprefix("[").removesuffix("]").strip()
            value = [v.strip() for v in text.split(",")] if text else []
        if not isinstance(value, (list, tuple)):
            raise bad
        return tuple(coerce(key, args[0], v) for v in value)
    if value is None:
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp in (int, float):
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return tp(value)
        if isinstance(value, str):  # PyYAML reads "2e-6" (no dot) as a string
            try:
                return tp(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported config type for {key}: {tp}")


def from_dict(data: Mapping[str, Any], cls: type = RunConfig, prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a nested mapping; missing keys keep their default."""
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"expected a mapping, got {data!r}")
    hints, names = _hints(cls), [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in hints:
            valid = list(leaf_keys(RunConfig)) + _section_keys(RunConfig)
            raise ConfigError(key, f"unknown key; {_nearest(key, valid)}")
        if _is_section(hints[name]):
            if not isinstance(value, Mapping):
                raise ConfigError(key, f"is a section; set its fields as {key}.<field>, "
                                  f"got {value!r}")
            kwargs[name] = from_dict(value, hints[name], key + ".")
        else:
            kwargs[name] = coerce(key, hints[name], value)
    for name in names:  # build default sections here so that their errors carry the prefix
        if name not in kwargs and _is_section(hints[name]):
            kwargs[name] = from_dict({}, hints[name], prefix + name + ".")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise (e.under(prefix.rstrip(".")) if prefix else e) from None


def _section_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, tp in _hints(cls).items():
        if _is_section(tp):
            out += [prefix + name] + _section_keys(tp, prefix + name + ".")
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists): JSON/YAML-safe, and ``from_dict`` inverts it."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        return [plain(x) for x in v] if isinstance(v, tuple) else v
    return plain(cfg)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``key.sub=value`` strings into a nested dict (copied); keys checked, values raw."""
    keys = leaf_keys(RunConfig)
    out = _deep_copy(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(item, "overrides look like key.sub=value")
        if key not in keys:
            hint = ("is a section; set one of its fields" if key in _section_keys(RunConfig)
                    else "unknown key")
            raise ConfigError(key, f"{hint}; {_nearest(key, list(keys))}")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(p, f"is a section, got {node!r}")
        node[leaf] = value
    return out


def _deep_copy(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """YAML file (optional) + overrides -> validated ``RunConfig``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(str(path), f"not valid YAML: {e}") from None
    return from_dict(apply_overrides(data, overrides))


def format_help(cls: type = RunConfig) -> str:
    """Every option with its type, default and doc, grouped by section."""
    return "\n".join(["usage: python -m topd_jax.train [--config FILE.yaml] [key.sub=value ...]", "",
                      format_options(cls)])


def format_options(cls: type = RunConfig) -> str:
    """The config options (``format_help`` without the usage line): the ``--help`` epilog of
    ``python -m topd_jax.train``."""
    lines = ["Config options (YAML keys, or key.sub=value on the command line):"]

    def walk(c: type, prefix: str, doc: str | None):
        if doc:
            lines.extend(["", f"[{prefix.rstrip('.') or 'run'}] {doc}"])
        hints, nested = _hints(c), []
        for f in dataclasses.fields(c):
            if _is_section(hints[f.name]):
                nested.append((hints[f.name], prefix + f.name + ".", f.metadata["help"]))
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {prefix}{f.name}: {_type_name(hints[f.name])} = {default!r}")
            lines.append(f"      {f.metadata['help']}")
        for args in nested:
            walk(*args)

    walk(cls, "", (cls.__doc__ or "").strip().splitlines()[0])
    return "\n".join(lines)


def parse_cli(argv: Sequence[str], default_config: str | Path | None = None) -> RunConfig:
    """``[--config FILE] [key=value ...] | --help`` -> RunConfig (help: print, exit 0)."""
    config, overrides, rest = default_config, [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg in ("-h", "--help"):
            print(format_help())
            raise SystemExit(0)
        if arg == "--config":
            if not rest:
                raise ConfigError("--config", "needs a file path")
            config = rest.pop(0)
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(arg, "expected --config FILE, --help or key.sub=value")
    return load_config(config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m topd_jax.config``: print the resolved config as YAML; a bad
    key, value or file is one ``error:`` line and exit 2 (``topd_jax.cli_common``)."""
    from topd_jax.cli_common import run_command

    def body(args: list[str]) -> int:
        print(yaml.safe_dump(to_dict(parse_cli(args)), sort_keys=False))
        return 0
    return run_command(body, argv, usage=(ConfigError, FileNotFoundError))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
