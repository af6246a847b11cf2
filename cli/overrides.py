"""RecPOConfig from a YAML file plus command-line overrides, one way for train and retrain.

`--max-steps` and friends are shorthands; `--set FIELD=VALUE` reaches any field. Both land
in one dict of field -> value, checked against the dataclass, so a new RecPOConfig field is
settable from the command line without touching the CLI.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

if TYPE_CHECKING:
    from model.recpo import RecPOConfig

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="FIELD=VALUE",
        help="Any RecPOConfig field, repeatable (e.g. --set learning_rate=5e-5 --set lora_layers=null)",
    ),
]


def recpo_config(config: Path | None, sets: list[str] | None = None, **options: Any) -> RecPOConfig:
    """The config file's RecPOConfig (defaults without one) with `options` (the shorthand
    options; None = not given) and `--set` pairs applied. Raises ValueError naming the bad
    pair, field or combination (RecPOConfig's own checks run on the final values)."""
    from model.recpo import RecPOConfig, read_config_file

    overrides = {k: v for k, v in options.items() if v is not None}
    for name, value in parse_sets(sets or [], RecPOConfig).items():
        if name in overrides and overrides[name] != value:
            raise ValueError(f"{name} is given twice: --{name.replace('_', '-')} and --set {name}=...")
        overrides[name] = value
    if config is None:
        return RecPOConfig(**overrides)
    try:
        fields = read_config_file(config)
    except ValueError as exc:  # what is wrong with the file itself, under the option's name
        raise ValueError(f"--config {exc}") from None
    # None overrides mean "not given" to the constructor's merge, so a `--set x=null` goes
    # in by replace(), which runs __post_init__ again on the combined values.
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = RecPOConfig(**{**fields, **given})
    nulls = {k: v for k, v in overrides.items() if v is None}
    return dataclasses.replace(cfg, **nulls) if nulls else cfg


def parse_sets(pairs: list[str], cls: type) -> dict[str, Any]:
    """`["lora_r=8", "lora_layers=null"]` -> `{"lora_r": 8, "lora_layers": None}`, each value
    read as YAML and checked against the field's declared type."""
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)  # the annotations are strings (postponed evaluation)
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--set wants FIELD=VALUE, got {pair!r}")
        if name not in names:
            raise ValueError(
                f"--set {pair}: {cls.__name__} has no field {name!r}; fields: {', '.join(names)}"
            )
        try:
            out[name] = _coerce(raw, hints[name])
        except ValueError:
            raise ValueError(f"--set {pair}: {name} takes {_type_name(hints[name])}, got {raw!r}") from None
    return out


def _coerce(raw: str, tp: Any) -> Any:
    """One value of type `tp` (bool, int, float, str, Literal, list[...] or X | None) from its text."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        value = _yaml(raw)
        for choice in args:
            if choice in (value, raw):
                return choice
        raise ValueError(raw)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if _yaml(raw) is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(raw, inner)
    if tp is str:
        return raw  # as written: `--set system_prompt=You recommend movies.`
    value = _yaml(raw)
    if typing.get_origin(tp) is list:
        items = value if isinstance(value, list) else [v.strip() for v in raw.split(",") if v.strip()]
        return [_coerce(str(v), args[0]) for v in items]
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and not isinstance(value, bool):
        try:
            return float(raw)  # YAML reads 5e-5 (no dot) as a string; float() does not
        except ValueError:
            pass
    raise ValueError(raw)


def _yaml(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # not YAML: a plain string, which only a str field accepts


def _type_name(tp: Any) -> str:
    """`int`, `float | None`, `list[str]`: as the field is declared."""
    return tp.__name__ if isinstance(tp, type) and typing.get_origin(tp) is None else str(tp)
