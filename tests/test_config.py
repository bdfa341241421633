"""Config precedence: defaults < TOML < flags; unknown keys and bad types are errors."""

import dataclasses
import re
from pathlib import Path
from typing import Literal

import pytest

from cxrdiff.config import from_dict, load_config, to_dict
from cxrdiff.errors import InputError


@dataclasses.dataclass(frozen=True)
class Example:
    out: Path | None = None
    steps: int = 10
    lr: float = 5e-5
    frozen: bool | None = None
    words: tuple[str, ...] | None = None
    mode: Literal["noise", "invert"] = "noise"


def test_precedence(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('steps = 20\nlr = 1e-4\nout = "x"\n')
    config = load_config(Example, file, steps=30, lr=None)
    assert config == Example(out=Path("x"), steps=30, lr=1e-4)
    assert load_config(Example) == Example()


def test_unknown_key_and_bad_type(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text("stepz = 20\n")
    with pytest.raises(InputError, match=r"c.toml: unknown key\(s\) stepz"):
        load_config(Example, file)
    file.write_text('steps = "many"\n')
    with pytest.raises(InputError, match="'steps' = 'many' is not a valid int"):
        load_config(Example, file)
    with pytest.raises(InputError, match="not found"):
        load_config(Example, tmp_path / "missing.toml")


def test_round_trip():
    config = Example(out=Path("o"), words=("a", "b"), frozen=True)
    assert from_dict(Example, to_dict(config)) == config
    assert to_dict(config)["words"] == ["a", "b"]


def test_a_single_string_for_a_list_is_one_item_not_its_letters(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('words = "effusion"\n')
    assert load_config(Example, file).words == ("effusion",)
    file.write_text('words = ["left", "effusion"]\n')
    assert load_config(Example, file).words == ("left", "effusion")


def test_a_bad_choice_names_the_choices(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('mode = "inverse"\n')
    with pytest.raises(InputError, match=r"'mode' = 'inverse' is not a valid choice \(one of noise, invert\)"):
        load_config(Example, file)
    assert load_config(Example, mode="invert").mode == "invert"


@dataclasses.dataclass(frozen=True)
class Required:
    out: Path
    prompt: str = "x"


def test_a_missing_or_mistyped_field_names_the_field_and_the_file(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text('prompt = "effusion"\n')
    with pytest.raises(InputError, match=r"run.toml: missing required setting\(s\) 'out' \(--out\)") as info:
        load_config(Required, file)
    assert "__init__" not in str(info.value) and "positional" not in str(info.value)
    with pytest.raises(InputError, match=r"^missing required setting\(s\) 'out' \(--out\)"):
        load_config(Required)
    assert load_config(Required, file, out="o") == Required(out=Path("o"), prompt="effusion")
    file.write_text("step = 20\nmdoe = 'noise'\n")
    with pytest.raises(InputError, match=r"run.toml: unknown key\(s\) mdoe \(did you mean mode\?\), step \(did you "):
        load_config(Example, file)
    for text, message in [
        ("out = 3\n", "'out' = 3 is not a valid Path"),
        ("[out]\npath = 'x'\n", "'out' = {'path': 'x'} is not a valid Path"),
        ("prompt = ['a', 'b']\n", "'prompt' = ['a', 'b'] is not a valid str"),
    ]:
        file.write_text(text)
        with pytest.raises(InputError, match=r"run.toml: " + re.escape(message)):
            load_config(Required, file)
