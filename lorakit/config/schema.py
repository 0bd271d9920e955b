"""The one schema mechanism behind every job's options.

Each job (train, merge, extract, generate, prepare, push, ...) is a dataclass whose fields are declared with
`option(...)`: type (from the annotation), default, help text, group, choices and bounds. Everything else is derived
from those fields — the CLI flags (`cli.py`), TOML loading, the metadata saved in outputs, and the notebook forms
(`widgets.py`). There is no second list of options anywhere.

Why dataclasses and not pydantic: the standard library is enough for flat configs of scalars and lists, adds no
dependency, and the field metadata (`help`, `group`, `choices`) is exactly what peft's configs use. Validation is
explicit in `validate()` so every message can name the field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    group: str = "general",
    choices: list | tuple | None = None,
    aliases: dict | None = None,
    min: float | None = None,
    max: float | None = None,
    basic: bool = False,
    secret: bool = False,
    cli_only: bool = False,
    default_factory: Any = MISSING,
):
    """Declare one config field.

    `basic` fields are shown first in forms; `secret` fields (tokens) are never saved or printed;
    `min`/`max` are inclusive bounds checked by `validate()`; `aliases` maps other accepted spellings of a choice
    (sd-scripts' names) to the choice.
    """
    meta = dict(help=help, group=group, choices=tuple(choices) if choices else None, aliases=aliases, min=min,
                max=max, basic=basic, secret=secret, cli_only=cli_only)
    if isinstance(default, (list, dict, set)):
        default_factory, default = (lambda d=default: type(d)(d)), MISSING
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


class Number:
    """The schema type of an `int | float` option: an integer stays an integer (a count), any other number is a
    float (a fraction), as in sd-scripts' `lr_warmup_steps = 100` or `lr_warmup_steps = 0.05`."""


@dataclass(frozen=True)
class FieldSpec:
    """Everything a face (CLI, TOML, widget, metadata) needs to know about one field."""

    name: str
    type: Any  # the base type: bool, int, float, str, or list[...] given as `list`
    item_type: Any  # element type for lists, else None
    optional: bool
    default: Any
    help: str
    group: str
    choices: tuple | None
    min: float | None
    max: float | None
    basic: bool
    secret: bool
    aliases: dict | None = None  # other spellings of a choice -> the choice


def _unwrap(tp) -> tuple[Any, Any, bool]:
    """Return (base type, item type, optional) for the annotations lorakit uses."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if set(args) == {int, float}:
            return Number, None, optional
        if len(args) != 1:
            raise TypeError(f"unsupported annotation {tp}")
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return list, typing.get_args(tp)[0], optional
    return tp, None, optional


def _type_name(spec: FieldSpec) -> str:
    if spec.type is list:
        return f"a list of {spec.item_type.__name__}"
    return {bool: "true/false", int: "an integer", float: "a number", Number: "a number", str: "a string"}.get(
        spec.type, str(spec.type))


# how a switch's value is written on a command line (also `--shuffle_caption true`, as pasted commands have it)
BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _coerce_scalar(spec: FieldSpec, tp, value, where: str):
    """Check/convert one scalar. Strings from the CLI are parsed; values from TOML must already have the type."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in BOOL_WORDS:
            return BOOL_WORDS[value.lower()]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is Number:
        if isinstance(value, str):
            try:
                if value.strip().endswith("%"):  # sd-scripts' "5%": a fraction of the training steps
                    value = float(value.strip()[:-1]) / 100
                else:
                    value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value) if isinstance(value, float) and value.is_integer() else value
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"`{spec.name}` must be {_type_name(spec)}, got {_shown(spec, value)}{where}")


def _shown(spec: FieldSpec, value) -> str:
    """A value as an error message shows it: a secret field's (a token) only by its type."""
    return f"a {type(value).__name__}" if spec.secret else repr(value)


def _canonical_choice(spec: FieldSpec, value):
    """A choice written in another case (`adamw`, sd-scripts accepts it) or as one of its aliases (`k_euler_a`) as
    the schema spells it (`AdamW`, `euler_a`)."""
    if spec.choices is None or not isinstance(value, str) or value in spec.choices:
        return value
    aliases = {k.lower(): v for k, v in (spec.aliases or {}).items()}
    if value.lower() in aliases:
        return aliases[value.lower()]
    return next((c for c in spec.choices if isinstance(c, str) and c.lower() == value.lower()), value)


# seeds are A1111's 32-bit numbers; lorakit derives per-step and per-image seeds from them, all within torch's range
SEED_MAX = 2**32 - 1
IMAGE_SIZE_MAX = 4096  # pixels a side of a generated image: SD's U-Net at 4096² already needs tens of GB


def _check_range(spec: FieldSpec, item, where: str = "") -> None:
    """The field's choices and bounds, for one (scalar) value; a float is a finite number, a seed below 2^32."""
    if spec.choices is not None and item not in spec.choices:
        raise ConfigError(f"`{spec.name}` must be one of {', '.join(map(str, spec.choices))}; got {item!r}{where}")
    if isinstance(item, float) and not math.isfinite(item):
        raise ConfigError(f"`{spec.name}` must be a finite number, got {item}{where}")
    if spec.name.endswith("seed") and isinstance(item, int) and not isinstance(item, bool) and item > SEED_MAX:
        raise ConfigError(f"`{spec.name}` must be ≤ {SEED_MAX} (2^32 − 1), got {item}{where}")
    if isinstance(item, (int, float)) and not isinstance(item, bool):
        if spec.min is not None and item < spec.min:
            random = " (A1111's -1 for a random seed is `none` here)" if spec.name.endswith("seed") and item == -1 \
                and spec.optional else ""
            raise ConfigError(f"`{spec.name}` must be ≥ {spec.min}, got {item}{where}{random}")
        if spec.max is not None and item > spec.max:
            raise ConfigError(f"`{spec.name}` must be ≤ {spec.max}, got {item}{where}")


def checked_value(spec: FieldSpec, value, where: str = ""):
    """One value for the field `spec` from another source (e.g. a dataset TOML): its type converted or refused,
    its choices and bounds checked, as `validate()` would; errors name the field and `where`."""
    value = JobConfig.coerce(spec, value, where)
    for item in value if isinstance(value, list) else [] if value is None else [value]:
        _check_range(spec, item, where)
    return value


def scalar_spec(name: str, type_: type, default=None, *, min: float | None = None) -> FieldSpec:
    """A FieldSpec for a value that is not a job option (e.g. a dataset TOML's `num_repeats`)."""
    return FieldSpec(name=name, type=type_, item_type=None, optional=default is None, default=default, help="",
                     group="", choices=None, min=min, max=None, basic=False, secret=False)


def check_extension(name: str, value: str, where: str = "") -> None:
    """A file-extension option (`caption_extension`) must start with a dot: `.txt`, not `txt`."""
    if not value.startswith(".") or len(value) < 2:
        raise ConfigError(f"`{name}` must be a file extension starting with a dot, e.g. \".txt\" or "
                          f"\".caption\"; got {value!r}{where}")


def resolve_foreign_keys(data: dict, own: set[str], where: str = "", *, aliases: dict[str, str],
                         ignored: dict[str, str], unsupported: dict[str, tuple[tuple, str]]) -> dict:
    """`JobConfig.resolve_foreign` with its tables given (also used for the tables of a dataset TOML); `own`: the
    keys that are lorakit's, which the tables never touch."""
    out, off = {}, []
    for key, value in data.items():
        key = aliases.get(key, key) if key not in own else key
        if key in ignored and key not in own:
            print(f"note: `{key}`{where} is not used by lorakit: {ignored[key]}", file=sys.stderr)
        elif key in unsupported and key not in own:
            offs, what = unsupported[key]
            if value not in offs:
                raise ConfigError(f"`{key}`{where} is set, but lorakit does not have {what} (an sd-scripts "
                                  f"option); remove it, or set it to {_off_spelling(offs)} (off)")
            off.append(key)
        else:
            out[key] = value
    if off:
        print(f"note: {len(off)} sd-scripts option(s){where} set to off are not in lorakit: "
              f"{', '.join(off)}", file=sys.stderr)
    return out


def _off_spelling(offs: tuple) -> str:
    """How to write an option's "off" value in TOML: `false`, `0`, `"l2"`, …"""
    value = next((v for v in offs if v is not None), None)
    if isinstance(value, bool):
        return "false"
    return json.dumps(value) if isinstance(value, (str, list)) else str(value)


class JobConfig:
    """Mixin for job configs: construction from dicts/TOML/CLI, validation, export."""

    job: ClassVar[str] = ""
    # fields whose value may be given positionally on the CLI (e.g. `lorakit inspect file.safetensors`)
    positional: ClassVar[tuple[str, ...]] = ()

    # ---------- the schema
    @classmethod
    def specs(cls) -> list[FieldSpec]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            base, item, optional = _unwrap(hints[f.name])
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else MISSING)
            m = f.metadata
            out.append(FieldSpec(f.name, base, item, optional, default, m.get("help", ""), m.get("group", "general"),
                                 m.get("choices"), m.get("min"), m.get("max"), m.get("basic", False),
                                 m.get("secret", False), m.get("aliases")))
        return out

    @classmethod
    def spec_map(cls) -> dict[str, FieldSpec]:
        """`{name: FieldSpec}` of every field, in declaration order."""
        return {s.name: s for s in cls.specs()}

    @classmethod
    def spec(cls, name: str) -> FieldSpec:
        return cls.spec_map()[name]

    # ---------- construction
    def __post_init__(self):
        for spec in self.specs():  # values given in Python read as a TOML's would
            value = getattr(self, spec.name)
            if spec.choices is not None:  # `optimizer_type="adamw"`, `sample_sampler="k_euler_a"`
                canonical = ([_canonical_choice(spec, v) for v in value] if isinstance(value, list)
                             else _canonical_choice(spec, value))
                if canonical != value:
                    setattr(self, spec.name, canonical)
            elif spec.type is Number and isinstance(value, float) and value.is_integer():
                setattr(self, spec.name, int(value))  # 100.0 warm-up steps are 100 steps, not a fraction
        self.validate()

    @classmethod
    def coerce(cls, spec: FieldSpec, value, where: str = ""):
        if spec.optional and isinstance(value, str) and value.strip().lower() in (
                ("none",) if spec.type is str else ("none", "")):
            value = None  # `--sample_every_n_steps none`, `--reg_data_dir none` unset an option a TOML set
        if value is None:
            if spec.optional or spec.default is None:
                return None
            raise ConfigError(f"`{spec.name}` must be set ({_type_name(spec)}){where}")
        if spec.type is list:
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                value = [v.strip() for v in value.split(",")] if isinstance(value, str) else [value]
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"`{spec.name}` must be {_type_name(spec)}, got {_shown(spec, value)}{where}")
            return [_canonical_choice(spec, _coerce_scalar(spec, spec.item_type, v, where)) for v in value]
        return _canonical_choice(spec, _coerce_scalar(spec, spec.type, value, where))

    @classmethod
    def resolve_foreign(cls, data: dict, where: str = "") -> dict:
        """`data` with other tools' option names dealt with, as the class's tables say: `aliases` (another spelling)
        renamed, `ignored_options` (nothing to do here) left out with a note, `unsupported_options` (a feature
        lorakit lacks) left out while set to an "off" value and refused by name otherwise. Other keys pass as they
        are; the job's own options always win over the tables."""
        return resolve_foreign_keys(data, set(cls.spec_map()), where, aliases=getattr(cls, "aliases", {}),
                                    ignored=getattr(cls, "ignored_options", {}),
                                    unsupported=getattr(cls, "unsupported_options", {}))

    @classmethod
    def from_dict(cls, data: dict, *, where: str = ""):
        """Build from a plain dict (TOML, JSON, widgets). Unknown keys are errors with a suggestion."""
        specs = cls.spec_map()
        kwargs = {}
        for key, value in cls.resolve_foreign(data, where).items():
            if key not in specs:
                close = difflib.get_close_matches(key, list(specs), n=1)
                hint = f"; did you mean `{close[0]}`?" if close else f"; valid options: `lorakit {cls.job} --help`"
                raise ConfigError(f"unknown option `{key}` for `{cls.job}`{where}{hint}")
            kwargs[key] = cls.coerce(specs[key], value, where)
        missing = [s.name for s in specs.values() if s.default is MISSING and s.name not in kwargs]
        if missing:
            raise ConfigError(f"`{missing[0]}` is required for `{cls.job}`{where}")
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str | os.PathLike, overrides: dict | None = None):
        """Load a TOML file (flat `name = value`, sections are allowed and flattened); `overrides` win."""
        flat = flat_toml(path)
        specs = cls.spec_map()
        for key, value in (overrides or {}).items():  # errors in a command-line value say so
            flat[key] = cls.coerce(specs[key], value, " (on the command line)") if key in specs else value
        return cls.from_dict(flat, where=f" (in {Path(path).name})")

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        specs = self.spec_map()
        for k in changes:
            if k not in specs:
                raise ConfigError(f"unknown option `{k}` for `{self.job}`")
        return dataclasses.replace(self, **{k: self.coerce(specs[k], v) for k, v in changes.items()})

    # ---------- validation
    def validate(self) -> None:
        """Types, choices, bounds, then the job's own cross-field checks in `check()`."""
        for s in self.specs():
            v = getattr(self, s.name)
            if v is None:
                if not (s.optional or s.default is None):
                    raise ConfigError(f"`{s.name}` must be set ({_type_name(s)})")
                continue
            values = v if isinstance(v, list) else [v]
            if s.type is not list and isinstance(v, list):
                raise ConfigError(f"`{s.name}` must be {_type_name(s)}, got a list")
            for item in values:
                _check_range(s, item)
        self.check()

    def check(self) -> None:
        """Cross-field checks; overridden per job."""

    # ---------- export
    def to_dict(self, *, include_secrets: bool = False) -> dict:
        """All fields as plain values (for metadata, JSON, TOML). Secret fields are left out unless asked."""
        return {s.name: getattr(self, s.name) for s in self.specs() if include_secrets or not s.secret}

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps({k: v for k, v in self.to_dict().items() if v is not None})

    def save_toml(self, path: str | os.PathLike) -> Path:
        from ..fileio import write_text

        return write_text(path, self.to_toml())

    def __repr__(self) -> str:
        body = ", ".join(f"{s.name}={'***' if s.secret and getattr(self, s.name) else getattr(self, s.name)!r}"
                         for s in self.specs())
        return f"{type(self).__name__}({body})"


def read_toml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    from ..fileio import read_utf8

    try:
        return tomllib.loads(read_utf8(path, "config file"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path.name}: invalid TOML ({e})") from None


def flat_toml(path: str | os.PathLike) -> dict:
    """A config file's `name = value` pairs, its [model], [training] … sections flattened (they are a convenience:
    one key may be set once only)."""
    flat, seen = {}, {}
    for k, v in read_toml(path).items():
        for key, value, where in ([(sub, x, f"[{k}]") for sub, x in v.items()] if isinstance(v, dict)
                                  else [(k, v, "the top level")]):
            if key in seen:
                raise ConfigError(f"`{key}` is set twice in {Path(path).name} (at {seen[key]} and in {where})")
            flat[key], seen[key] = value, where
    return flat


def toml_value(text: str):
    """A command-line word as TOML reads a value (`0` → 0, `false` → False, `0.1` → 0.1), else the word itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, ValueError):
        return text


def parse_resolution(value: str | int | None) -> tuple[int, int] | None:
    """`"512"` → (512, 512); `"768,512"` → (768, 512) as (width, height)."""
    if value is None:
        return None
    parts = [p.strip() for p in str(value).replace("x", ",").split(",") if p.strip()]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"`resolution` must be \"N\" or \"W,H\", got {value!r}") from None
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) < 8:
        raise ConfigError(f"`resolution` must be \"N\" or \"W,H\" with sizes ≥ 8, got {value!r}")
    return nums[0], nums[1]
