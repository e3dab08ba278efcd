"""Environment-variable knobs: each declared once with type, default, one line of doc and aliases.

A trainer declares a tuple of `Knob`s; `parse_knobs` resolves them from the environment into a
`Config` (attribute per knob, lower-case name). Errors name the variable: a value of the wrong type,
an alias set together with its knob, or a variable whose name is close to a knob's (a likely
misspelling: NUM_LAYRES -> NUM_LAYERS) all stop the run before anything is trained.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# Variables set by launchers and libraries whose names sit near knob names but are not knobs.
_FOREIGN = {
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
    "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PYTHONPATH", "HF_ENDPOINT", "HF_HOME",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class KnobError(ValueError):
    """A knob set to something the trainer cannot use."""


@dataclass(frozen=True)
class Alias:
    """Another name public entries use for a knob; `convert(raw, env)` maps its value to the knob's."""
    name: str
    convert: Callable[[str, Mapping[str, str]], Any] | None = None
    note: str = ""


@dataclass(frozen=True)
class Knob:
    name: str
    type: type
    default: Any
    doc: str
    aliases: tuple[Alias, ...] = field(default=())

    def parse(self, raw: str, source: str) -> Any:
        raw = raw.strip()
        try:
            if self.type is bool:
                low = raw.lower()
                if low in _TRUE:
                    return True
                if low in _FALSE:
                    return False
                raise ValueError
            return self.type(raw)
        except ValueError:
            kind = "0/1" if self.type is bool else self.type.__name__
            raise KnobError(f"{source}={raw!r}: expected {kind} ({self.name}: {self.doc})") from None


class Config:
    """Resolved knobs: `cfg.num_layers`; `cfg.sources` says where each value came from."""

    def __init__(self, values: dict[str, Any], sources: dict[str, str]):
        self._values = dict(values)
        self.sources = dict(sources)
        for name, value in values.items():
            setattr(self, name.lower(), value)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def replace(self, **changes: Any) -> "Config":
        """A copy with some values changed (names in lower case), e.g. for tests."""
        values = dict(self._values)
        for key, value in changes.items():
            if key.upper() not in values:
                raise KnobError(f"unknown knob {key.upper()}")
            values[key.upper()] = value
        return Config(values, {**self.sources, **{k.upper(): "replace" for k in changes}})


def _check_table(knobs: tuple[Knob, ...]) -> None:
    seen: set[str] = set()
    for knob in knobs:
        for name in (knob.name, *(a.name for a in knob.aliases)):
            if name in seen:
                raise KnobError(f"knob name {name} is declared twice")
            seen.add(name)


def parse_knobs(knobs: tuple[Knob, ...], env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    _check_table(knobs)
    known = {k.name for k in knobs} | {a.name for k in knobs for a in k.aliases}
    for var in env:
        if var in known or var in _FOREIGN or len(var) < 5:
            continue
        close = difflib.get_close_matches(var, sorted(known), n=1, cutoff=0.85)
        if close:
            raise KnobError(f"{var} is not a knob; did you mean {close[0]}? (python train_gpt.py --help lists them)")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for knob in knobs:
        set_aliases = [a for a in knob.aliases if a.name in env]
        if knob.name in env and set_aliases:
            raise KnobError(f"both {knob.name} and its alias {set_aliases[0].name} are set; set one")
        if len(set_aliases) > 1:
            raise KnobError(f"aliases {set_aliases[0].name} and {set_aliases[1].name} of {knob.name} are both set")
        if knob.name in env:
            values[knob.name] = knob.parse(env[knob.name], knob.name)
            sources[knob.name] = "env"
        elif set_aliases:
            alias = set_aliases[0]
            raw = env[alias.name]
            try:
                value = alias.convert(raw, env) if alias.convert else raw
            except (ValueError, ZeroDivisionError) as e:
                raise KnobError(f"{alias.name}={raw!r}: cannot convert to {knob.name}: {e}") from None
            values[knob.name] = knob.parse(str(value), alias.name)
            sources[knob.name] = f"alias {alias.name}"
        else:
            values[knob.name] = knob.default
            sources[knob.name] = "default"
    return Config(values, sources)


def help_text(knobs: tuple[Knob, ...], title: str) -> str:
    width = max(len(k.name) for k in knobs)
    lines = [title, "", "Every setting is an environment variable:", ""]
    for k in knobs:
        if k.default is None:
            default = "auto"
        elif k.default == "":
            default = "''"
        else:
            default = int(k.default) if k.type is bool else k.default
        lines.append(f"  {k.name:<{width}}  {k.type.__name__:<5} default {default!s:<10} {k.doc}")
        for a in k.aliases:
            lines.append(f"  {'':<{width}}  alias {a.name}" + (f": {a.note}" if a.note else ""))
    return "\n".join(lines)


def format_config(cfg: Config) -> list[str]:
    """One `name=value (source)` line per knob, for the top of a log."""
    return [f"{name}={value!r} ({cfg.sources[name]})" for name, value in cfg.as_dict().items()]
