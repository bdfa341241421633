"""Typed, frozen configs: defaults < `--config file.toml` < flags; unknown keys are errors.

Every number field declares its allowed values beside its type, `Annotated[float, Range(gt=0)]`, so the range
lives with the field and `--help`'s defaults (read from the source) stay plain literals. `load_config` checks
TOML values and flags as they arrive (naming the file or the flag); `check_ranges`, which every step calls
first, covers configs built in Python too. NaN and infinities are refused wherever a number is meant.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from cxrdiff.errors import InputError

C = TypeVar("C")


@dataclasses.dataclass(frozen=True)
class Range:
    """The allowed values of a number field: finite, and within the bounds given (None: no bound)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, value: float) -> bool:
        return (
            math.isfinite(value)
            and (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def text(self, integer: bool) -> str:
        """What `holds` asks, in words: "at least 1" for an integer, "a finite number > 0" for a float."""
        if integer and self.ge is not None and self.gt is None and self.lt is None:
            return f"at least {self.ge}" if self.le is None else f"between {self.ge} and {self.le}"
        if (self.ge, self.gt) != (None, None) and (self.le, self.lt) != (None, None):
            low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}"
            high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})"
            return f"a finite number in {low}, {high}"
        bounds = (("≥", self.ge), (">", self.gt), ("≤", self.le), ("<", self.lt))
        return " ".join(["a finite number", *(f"{op} {v:g}" for op, v in bounds if v is not None)])


def number_fields(cls: type) -> dict[str, tuple[type, Range | None]]:
    """Each int or float field of a config class: its number type and its declared `Range` (None: none)."""
    out: dict[str, tuple[type, Range | None]] = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        if name not in {f.name for f in dataclasses.fields(cls)}:  # type: ignore[arg-type]
            continue
        declared = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Range)), None)
        base = _plain_hint(hint)
        if typing.get_origin(base) in (typing.Union, types.UnionType):
            base = next(a for a in typing.get_args(base) if a is not type(None))
        if base in (int, float):
            out[name] = (base, declared)
    return out


def check_value(name: str, value: Any, kind: type, declared: Range | None, where: str | None = None) -> None:
    """Refuse a number outside its field's range, in one line naming the flag (or the file and key)."""
    if value is None or declared is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not declared.holds(value):
        label = f"--{name.replace('_', '-')} {value}" if where is None else f"{where}: '{name}' = {value!r}"
        raise InputError(f"{label}: must be {declared.text(kind is int)}")


def check_ranges(config: Any) -> None:
    """Every number of a config within its declared range: each step calls this first, so a config built in
    Python is checked as one from the command line is (there by `load_config`, naming the file or flag)."""
    for name, (kind, declared) in number_fields(type(config)).items():
        check_value(name, getattr(config, name), kind, declared)


def _plain_hint(hint: Any) -> Any:
    """A type hint without its `Annotated` extras."""
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    hint = _plain_hint(hint)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if hint is Path:
            if not isinstance(value, str | os.PathLike):
                raise TypeError
            return Path(value)
        if hint is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if hint is str and not isinstance(value, str):  # str() would take a table or a list without a word
            raise TypeError
        if hint in (int, float, str):
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise TypeError
            if hint in (int, float) and isinstance(value, bool):
                raise TypeError
            return hint(value)
        if origin is tuple:
            if isinstance(value, str):  # `word = "effusion"` in TOML means one item, not its letters
                value = [value]
            return tuple(_coerce(name, v, args[0], source) for v in value)
        if origin is typing.Literal:
            if value not in args:
                choices = ", ".join(str(a) for a in args)
                raise InputError(f"{source}: '{name}' = {value!r} is not a valid choice (one of {choices})")
            return value
    except (TypeError, ValueError):
        raise InputError(f"{source}: '{name}' = {value!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    return value


def load_config(cls: type[C], file: str | os.PathLike | None = None, **flags: Any) -> C:
    """Build `cls` from its defaults, then a TOML file, then the flags that were given (not None)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    numbers = number_fields(cls)
    values: dict[str, Any] = {}
    if file is not None:
        path = Path(file)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: config file not found") from None
        except IsADirectoryError:
            raise InputError(f"{path}: is a folder; --config takes a TOML file") from None
        except UnicodeDecodeError:
            raise InputError(f"{path}: not a UTF-8 text file; --config takes a TOML file") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{path}: not valid TOML ({exc})") from None
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - names)
        if unknown:
            guesses = [f"{k} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(k, names, 1)) else k
                       for k in unknown]  # fmt: skip
            raise InputError(f"{path}: unknown key(s) {', '.join(guesses)}; known: {', '.join(sorted(names))}")
        for k, v in data.items():
            values[k] = _coerce(k, v, hints[k], str(path))
            if k in numbers:
                check_value(k, values[k], *numbers[k], where=str(path))
    for key, value in flags.items():
        if key not in names:
            raise InputError(f"unknown option '{key}'")
        if value is not None:
            values[key] = _coerce(key, value, hints[key], f"--{key.replace('_', '-')}")
            if key in numbers:
                check_value(key, values[key], *numbers[key])
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values and _required(f)]  # type: ignore[arg-type]
    if missing:
        where = f"{file}: " if file is not None else ""
        wanted = ", ".join(f"'{name}' (--{name.replace('_', '-')})" for name in missing)
        raise InputError(f"{where}missing required setting(s) {wanted}; set them in the file or give the flags")
    return cls(**values)


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON-ready values, for the manifest."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Path):
            value = os.fspath(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Rebuild a config saved by `to_dict` (e.g. to resume with the same settings)."""
    return load_config(cls, None, **{k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}})  # type: ignore[arg-type]


def settings(config: Any, data_format: str | None = None, **derived: Any) -> dict[str, Any]:
    """The config fields that decide a step's outputs, plus derived values (an input's identity, a resolved
    dtype): what a step folder's settings key is made of. This function alone decides how a key is spelled, so
    that a folder's key stays the same as settings are added:

    - left out: the class's `NOT_SETTINGS` (where the output goes, speed, input paths whose identity joins as a
      derived value) and the fields of the other data formats (`FORMAT_FIELDS`: format → its own fields);
    - a setting at its `KEY_NEUTRAL` value (field → value) joins no key, nor does the format (`data_format`, or
      the config's `FORMAT_FIELD`) when it is the first of `FORMAT_FIELDS`: adding a setting with such a value
      keeps every key made without it;
    - `KEY_SPELLING` (field → (name in the key, {value: spelling in the key})) names a setting in the key."""
    cls = type(config)
    skip = set(getattr(cls, "NOT_SETTINGS", ("out",)))
    formats: dict[str, tuple[str, ...]] = getattr(cls, "FORMAT_FIELDS", {})
    field = getattr(cls, "FORMAT_FIELD", None)
    if field is not None:
        skip.add(field)
        data_format = getattr(config, field)
    if formats:
        own = set(formats.get(data_format, ()))  # a field several formats share stays in for each of them
        skip |= {name for fmt, names in formats.items() if fmt != data_format for name in names} - own
    neutral: dict[str, Any] = getattr(cls, "KEY_NEUTRAL", {})
    chosen = {k: v for k, v in to_dict(config).items() if k not in skip and (k not in neutral or v != neutral[k])}
    if formats and data_format is not None and data_format != next(iter(formats)):
        chosen[field or "format"] = data_format
    for name, (key, values) in getattr(cls, "KEY_SPELLING", {}).items():
        if name in chosen:
            value = chosen.pop(name)
            chosen[key] = values.get(value, value)
    return chosen | derived


def config_defaults(source: Path, class_name: str) -> dict[str, Any]:
    """A config class's literal field defaults (its base classes' first, and a default that names another
    config's, `SampleConfig.guidance`, as that one), read from its source file: the CLI's `--help` shows them
    without importing the step (numpy and more), so that help and completion stay instant. A test checks them
    against the dataclass."""
    import ast

    tree = ast.parse(source.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)

    def defaults_of(name: str) -> dict[str, Any]:  # a class defined in this file or imported from cxrdiff
        found = [n.module for n in tree.body if isinstance(n, ast.ImportFrom) and name in (a.name for a in n.names)]
        root = next(p for p in source.parents if p.name == "cxrdiff").parent
        return config_defaults(root.joinpath(*found[0].split(".")).with_suffix(".py") if found else source, name)

    defaults: dict[str, Any] = {}
    for base in cls.bases:
        defaults |= defaults_of(base.id) if isinstance(base, ast.Name) else {}
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign) or node.value is None or "ClassVar" in ast.unparse(node.annotation):
            continue
        value = node.value
        if isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name):
            defaults[node.target.id] = defaults_of(value.value.id).get(value.attr)  # type: ignore[union-attr]
            continue
        try:
            defaults[node.target.id] = ast.literal_eval(value)  # type: ignore[union-attr]
        except ValueError:  # not a literal (a factory): nothing to show
            continue
    return {name: value for name, value in defaults.items() if value is not None}
