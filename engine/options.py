"""Config fields that explain themselves: each carries its help text and unit, and the name under
which it is set from the command line (`--name`), the environment (`MCSERVE_NAME`) and a config
file (`name:`). A config class is a frozen dataclass of such fields, possibly holding other
config classes; `options()` flattens the tree into one list of options, from which the CLI
builds `--help`, reads the environment and the file. Plain data, no torch.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A bad option value; the message names the option as the user sets it."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, unit: str = "", name: str = "",
           choices: tuple = (), secret: bool = False, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with what `mcserve serve --help` says about it. `name` overrides the
    option's flat name (the field's own name by default); `secret` masks it wherever it is shown."""
    metadata = {"help": help, "unit": unit, "name": name, "choices": choices, "secret": secret}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata, repr=not secret)
    return dataclasses.field(default=default, metadata=metadata, repr=not secret)


@dataclass(frozen=True)
class Option:
    name: str               # flat: --name, MCSERVE_NAME, `name:` in a file
    path: tuple[str, ...]   # where in the config tree
    kind: type              # int, float, str or bool
    default: Any
    help: str
    unit: str
    choices: tuple
    secret: bool

    @property
    def env(self) -> str:
        return "MCSERVE_" + self.name.upper()

    def parse(self, text: str) -> Any:
        """A value from its text (the command line, the environment); ValueError names the option."""
        if self.kind is bool:
            lowered = text.strip().lower()
            if lowered in ("on", "true", "1", "yes"):
                return True
            if lowered in ("off", "false", "0", "no"):
                return False
            raise ValueError(f"{self.name} must be on or off, got {text!r}")
        try:
            return self.kind(text)
        except ValueError:
            raise ValueError(f"{self.name} must be a{'n' if self.kind is int else ''} "
                             f"{self.kind.__name__}, got {text!r}") from None


def options(cls: type, path: tuple[str, ...] = ()) -> list[Option]:
    """Every option of a config class and of the config classes it holds, in declaration order."""
    found: list[Option] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            found += options(kind, path + (f.name,))
            continue
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        found.append(Option(meta.get("name") or f.name, path + (f.name,), kind, default, meta.get("help", ""),
                            meta.get("unit", ""), meta.get("choices", ()), meta.get("secret", False)))
    names = [o.name for o in found]
    duplicated = {n for n in names if names.count(n) > 1}
    assert not duplicated, f"config options named twice: {duplicated}"
    return found


def build(cls: type, values: dict[str, Any]):
    """An instance of `cls` from flat option values (by name); what is not given keeps its default.
    Each config class validates itself as it is built."""
    nested: dict = {}
    for opt in options(cls):
        if opt.name in values:
            node = nested
            for part in opt.path[:-1]:
                node = node.setdefault(part, {})
            node[opt.path[-1]] = values[opt.name]
    return _construct(cls, nested)


def _construct(cls: type, nested: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {k: _construct(hints[k], v) if dataclasses.is_dataclass(hints[k]) else v for k, v in nested.items()}
    return cls(**kwargs)


def flat_values(config) -> dict[str, Any]:
    """The config's options by flat name (secrets masked): what the start-up line prints."""
    out = {}
    for opt in options(type(config)):
        value = config
        for part in opt.path:
            value = getattr(value, part)
        out[opt.name] = "***" if opt.secret and value else value
    return out


def check_options(config, error: type[ConfigError] = ConfigError, may_be_zero: tuple[str, ...] = ()) -> None:
    """The checks every option of a config class gets: numbers > 0 (>= 0 where named), and a
    value among the choices where there are some. Nested config classes check themselves."""
    for opt in options(type(config)):
        if len(opt.path) > 1:
            continue
        value = getattr(config, opt.path[0])
        if opt.choices and value not in opt.choices:
            raise error(f"{opt.name} must be one of {list(opt.choices)}, got {value!r}")
        if opt.kind in (int, float):
            zero_ok = opt.path[0] in may_be_zero
            if value < 0 or (value == 0 and not zero_ok):
                raise error(f"{opt.name} must be {'>= 0' if zero_ok else '> 0'}, got {value}")
