"""Config precedence: defaults < TOML < flags; unknown keys and bad types are errors."""

import dataclasses
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
