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


# --- number ranges: every number field of every step's config declares one -----------------------


def _step_configs():
    import importlib

    from cxrdiff.cli import STEP_CONFIGS

    for command, (file, class_name) in sorted(STEP_CONFIGS.items()):
        module = "cxrdiff." + file.removesuffix(".py").replace("/", ".")
        yield command, getattr(importlib.import_module(module), class_name)


def test_every_number_field_of_every_config_declares_a_range_its_default_keeps():
    from cxrdiff.config import number_fields

    seen = 0
    for command, cls in _step_configs():
        for name, (kind, declared) in number_fields(cls).items():
            assert declared is not None, f"{command}: {cls.__name__}.{name} ({kind.__name__}) has no Range"
            default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
            assert default is None or declared.holds(default), f"{cls.__name__}.{name}: default {default} refused"
            seen += 1
    assert seen >= 60  # the seven configs' int and float fields, optional ones included


def test_a_range_refuses_nan_infinity_and_values_outside_in_one_line(tmp_path):
    from cxrdiff.config import check_ranges
    from cxrdiff.finetune import FinetuneConfig
    from cxrdiff.ground import GroundConfig
    from cxrdiff.sample import SampleConfig

    for value, shown in ((float("nan"), "nan"), (0.0, "0.0"), (-5.0, "-5.0"), (float("inf"), "inf")):
        with pytest.raises(InputError, match=rf"^--guidance {shown}: must be a finite number ≥ 1$"):
            load_config(SampleConfig, None, guidance=value)
        with pytest.raises(InputError, match=rf"^--guidance {shown}: must be a finite number in \[1, 50\]$"):
            check_ranges(GroundConfig(guidance=value))  # built in Python: the step's own check
    assert load_config(SampleConfig, None, guidance=1.0).guidance == 1.0  # the bound itself is allowed
    with pytest.raises(InputError, match=r"^--lr inf: must be a finite number > 0$"):
        load_config(FinetuneConfig, None, lr=float("inf"))
    with pytest.raises(InputError, match=r"^--max-grad-norm -1.0: must be a finite number ≥ 0$"):
        load_config(FinetuneConfig, None, max_grad_norm=-1.0)
    with pytest.raises(InputError, match=r"^--keep-checkpoints 0: must be at least 1$"):
        check_ranges(FinetuneConfig(keep_checkpoints=0))
    file = tmp_path / "run.toml"
    file.write_text("ema_decay = 5.0\n")
    with pytest.raises(InputError, match=r"run.toml: 'ema_decay' = 5.0: must be a finite number in \[0, 1\]$"):
        load_config(FinetuneConfig, file)
    file.write_text("ucg_no_finding = nan\n")  # TOML has nan and inf literals
    with pytest.raises(InputError, match=r"run.toml: 'ucg_no_finding' = nan: must be a finite number in \[0, 1\]$"):
        load_config(FinetuneConfig, file)
    check_ranges(FinetuneConfig(ema_decay=1.0, max_grad_norm=0.0))  # bounds inside: no error


def test_a_step_refuses_a_python_built_config_out_of_range_before_touching_anything(tmp_path):
    from cxrdiff.finetune import FinetuneConfig, finetune
    from cxrdiff.sample import SampleConfig, sample

    with pytest.raises(InputError, match=r"^--guidance nan: must be"):
        sample(SampleConfig(model=tmp_path / "m", out=tmp_path / "s", prompt="x", guidance=float("nan")))
    config = FinetuneConfig(data=tmp_path, base_model=tmp_path, out=tmp_path / "f", frozen_text=True, ema_decay=5.0)
    with pytest.raises(InputError, match=r"^--ema-decay 5.0: must be a finite number in \[0, 1\]$"):
        finetune(config)
    assert not (tmp_path / "s").exists() and not (tmp_path / "f").exists()


@pytest.mark.parametrize(
    "argv, line",
    [
        (["sample", "--guidance", "nan"], "error: --guidance nan: must be a finite number ≥ 1"),
        (["sample", "--guidance", "0"], "error: --guidance 0.0: must be a finite number ≥ 1"),
        (["sample", "--guidance", "-5"], "error: --guidance -5.0: must be a finite number ≥ 1"),
        (["ground", "--guidance", "nan"], "error: --guidance nan: must be a finite number in [1, 50]"),
        (["ground", "--guidance", "1e30"], "error: --guidance 1e+30: must be a finite number in [1, 50]"),
        (["finetune", "--lr", "inf"], "error: --lr inf: must be a finite number > 0"),
        (["finetune", "--max-grad-norm", "-1"], "error: --max-grad-norm -1.0: must be a finite number ≥ 0"),
        (["model", "tiny", "OUT", "--resolution", "0"], "error: --resolution 0: must be a positive multiple of 4"),
        (["model", "tiny", "OUT", "--resolution", "-8"], "error: --resolution -8: must be a positive multiple of 4"),
        (["model", "tiny", "OUT", "--unet-channels", "32,48"], "error: --unet-channels 32,48: expected two or more"),
        (["model", "tiny", "OUT", "--text-width", "31"], "error: --text-width 31: must be a positive even number"),
    ],
)
def test_cli_refuses_bad_numbers_with_one_line_and_exit_2(argv, line, tmp_path, capsys, monkeypatch):
    from cli_main import run_main

    argv = [str(tmp_path / "out") if word == "OUT" else word for word in argv]
    code, err, _ = run_main(argv, capsys, monkeypatch)
    assert code == 2 and len(err) == 1 and err[0].startswith(line), err
    assert not (tmp_path / "out").exists()


def test_report_refuses_fewer_than_200_resamples():
    """The 2.5 % and 97.5 % percentiles of fewer resamples rest on a handful of draws each."""
    from cxrdiff.report.config import ReportConfig

    with pytest.raises(InputError, match=r"^--resamples 199: must be at least 200$"):
        load_config(ReportConfig, None, resamples=199)
    assert load_config(ReportConfig, None, resamples=200).resamples == 200


# --- settings keys: how a key is spelled ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Keyed:
    NOT_SETTINGS = ("out",)
    KEY_NEUTRAL = {"markers": "keep"}
    KEY_SPELLING = {"repeats": ("runs", {}), "precision": ("dtype", {"no": "float32", "bf16": "bfloat16"})}
    out: str = "folder"
    lr: float = 0.1
    markers: str = "keep"
    repeats: int = 1
    precision: str = "no"


def test_a_setting_at_its_neutral_value_joins_no_key_and_spelled_names_are_used():
    from cxrdiff.config import settings

    assert settings(Keyed(), model="m") == {"lr": 0.1, "runs": 1, "dtype": "float32", "model": "m"}
    changed = settings(Keyed(markers="strip", repeats=3, precision="bf16"))
    assert changed == {"lr": 0.1, "markers": "strip", "runs": 3, "dtype": "bfloat16"}


def test_the_finetune_key_holds_deid_markers_only_when_stripped():
    from cxrdiff.config import settings
    from cxrdiff.finetune import FinetuneConfig

    assert "deid_markers" not in settings(FinetuneConfig())
    assert settings(FinetuneConfig(deid_markers="strip"))["deid_markers"] == "strip"
