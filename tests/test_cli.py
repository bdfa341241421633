"""The command line: commands listed, fast --help without torch, exit codes, completions in sync."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cxrdiff import __version__
from cxrdiff.cli import completion_script

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("phantom", "prepare", "finetune", "sample", "ground", "report", "demo", "model")


def run(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "cxrdiff", *args], capture_output=True, text=True, **kwargs)


def test_help_lists_every_command():
    result = run("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert f" {command} " in result.stdout


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"cxrdiff {__version__}"


def test_help_imports_no_torch():
    code = (
        "import sys\n"
        "from cxrdiff.cli import app\n"
        "try:\n    app(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "for command in ('sample', 'ground', 'finetune', 'prepare', 'report'):\n"
        "    try:\n        app([command, '--help'], standalone_mode=False)\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in result.stdout, result.stdout[-500:] + result.stderr[-500:]


def test_bad_usage_exits_2():
    result = run("sample", "--no-such-option")
    assert result.returncode == 2
    assert "No such option" in result.stderr


def test_missing_model_folder_is_one_line_error_exit_2(tmp_path):
    result = run("model", "info", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: {tmp_path / 'nowhere'}: model folder not found (give a local diffusers Stable Diffusion folder)"
    ]
    assert "Traceback" not in result.stderr


def test_verbose_shows_traceback(tmp_path):
    result = run("-v", "model", "info", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "Traceback" in result.stderr


STEPS = {  # command → (module, step function, config class)
    "phantom": ("cxrdiff.phantom", "make_phantom", "PhantomConfig"),
    "prepare": ("cxrdiff.prepare", "prepare", "PrepareConfig"),
    "finetune": ("cxrdiff.finetune", "finetune", "FinetuneConfig"),
    "sample": ("cxrdiff.sample", "sample", "SampleConfig"),
    "ground": ("cxrdiff.ground", "ground", "GroundConfig"),
    "report": ("cxrdiff.report", "report", "ReportConfig"),
    "model pretrain-text": ("cxrdiff.model.pretrain_text", "pretrain_text", "PretrainTextConfig"),
    "model pretrain-bert": ("cxrdiff.model.pretrain_bert", "pretrain_bert", "PretrainBertConfig"),
}


def _options(command_function, tmp_path, config_class=None):
    """For each option of a command (read from its typed signature): the argv words that give it a
    non-default value within the config field's declared range, and the value its config field should then hold."""
    import enum
    import inspect
    import types
    import typing

    import typer

    defaults = inspect.signature(command_function).parameters
    for name, hint in typing.get_type_hints(command_function, include_extras=True).items():
        if name in ("config", "return"):
            continue
        # an option declared in Annotated[type, typer.Option(...)], or as `type = opt(...)` (its default)
        annotated = typing.get_origin(hint) is typing.Annotated
        base, info = (typing.get_args(hint)[:2]) if annotated else (hint, defaults[name].default)
        if typing.get_origin(base) in (typing.Union, types.UnionType):
            base = next(a for a in typing.get_args(base) if a is not type(None))
        many = typing.get_origin(base) is list
        item = typing.get_args(base)[0] if many else base
        if inspect.isclass(item) and issubclass(item, enum.Enum):
            raw, cast = [list(item)[-1].value], str
        elif item is Path:
            raw, cast = [str(tmp_path / f"{name}-{i}") for i in range(2 if many else 1)], Path
        else:
            raw = {int: ["7"], float: ["0.25"], bool: [], str: [f"{name}-a", f"{name}-b"][: 2 if many else 1]}[item]
            if item in (int, float) and config_class is not None and not _allows(config_class, name, item(raw[0])):
                raw = {int: ["40"], float: ["1.25"]}[item]
            cast = item
        value = True if item is bool else tuple(cast(v) for v in raw) if many else cast(raw[0])
        if isinstance(info, typer.models.ArgumentInfo):
            words = raw
        else:
            # In Annotated, typer takes typer.Option("--flag") as the flag's name (it lands in `default`).
            named = [d for d in (info.default, *info.param_decls) if isinstance(d, str) and d.startswith("-")]
            flag = (named[0] if named else "--" + name.replace("_", "-")).split("/")[0]
            words = [flag] if item is bool else [w for v in raw for w in (flag, v)]
        yield name, words, value


@pytest.mark.parametrize("command", sorted(STEPS))
def test_every_option_reaches_its_config_field(command, tmp_path, monkeypatch):
    """No option silently dropped: each option, given a non-default value, arrives in the config field of
    the same name (a repeated option as a tuple, a choice as its string)."""
    import importlib

    from typer.testing import CliRunner

    from cxrdiff import cli
    from cxrdiff.cli import app

    module_name, function, config_class = STEPS[command]
    module = importlib.import_module(module_name)
    received = []
    monkeypatch.setattr(module, function, lambda config: received.append(config) or {"ok": True})
    argv, expected = command.split(), {}
    config_type = getattr(module, config_class)
    for name, words, value in _options(getattr(cli, "_".join(argv).replace("-", "_")), tmp_path, config_type):
        argv += words
        expected[name] = value
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    (config,) = received
    assert type(config).__name__ == config_class
    for name, value in expected.items():
        assert getattr(config, name) == value, f"--{name}: {getattr(config, name)!r} != {value!r}"
        if name not in _required(config):  # the value given is not the default (else the check proves nothing)
            assert value != getattr(type(config)(**_required(config)), name), f"--{name}: the default was given"


def _allows(config_class, name, value):
    from cxrdiff.config import number_fields

    declared = number_fields(config_class)[name][1]
    return declared is None or declared.holds(value)


def _required(config):
    """The fields a config cannot be built without (phantom's out), taken from the received config."""
    import dataclasses

    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}  # fmt: skip


def test_choices_are_the_configs_literals():
    """The CLI's choices, the configs' Literal types and the registries come from one place."""
    import typing

    from cxrdiff import choices
    from cxrdiff.ground import GroundConfig
    from cxrdiff.sample import SCHEDULERS, SampleConfig

    hints = typing.get_type_hints(SampleConfig)
    assert typing.get_args(hints["scheduler"]) == typing.get_args(choices.Scheduler) == tuple(SCHEDULERS)
    assert typing.get_args(typing.get_type_hints(GroundConfig)["boxes"]) == ("union", "per-box", "per-phrase")


def test_model_tiny_and_info_json(tmp_path):
    out = tmp_path / "m"
    result = run("--json", "model", "tiny", str(out), "--resolution", "32")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["resolution"] == 32 and info["latent_shape"] == [4, 8, 8]
    assert info["context_length"] == 77 and info["vocab_size"] == 49408
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completions_match_the_app(shell):
    """Fails when completions/ drifts from the app: regenerate with scripts/make_completions.py."""
    shipped = (ROOT / "completions" / f"cxrdiff.{shell}").read_text()
    assert shipped == completion_script(shell)


def test_completion_callback_completes_commands():
    import os

    env = {**os.environ, "_CXRDIFF_COMPLETE": "complete_bash", "COMP_WORDS": "cxrdiff gro", "COMP_CWORD": "1"}
    result = subprocess.run([sys.executable, "-m", "cxrdiff"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.split() == ["ground"]


def _commands():
    """Every (sub)command of the app as click objects, through the app's own group (which adds the defaults)."""
    import typer
    from typer.main import get_command

    from cxrdiff.cli import app

    root = get_command(app)
    ctx = typer.Context(root)
    for name in root.list_commands(ctx):
        command = root.get_command(ctx, name)
        if hasattr(command, "list_commands"):
            sub_ctx = typer.Context(command, parent=ctx)
            yield from ((f"{name} {n}", command.get_command(sub_ctx, n)) for n in command.list_commands(sub_ctx))
        else:
            yield name, command


def _type_name(param):
    """The option's value type (newer Typer keeps it as `bare_type()`, older as click's `type.name`)."""
    bare = getattr(param, "bare_type", None)
    return str(bare()) if callable(bare) else param.type.name


def test_every_numeric_option_shows_its_default():
    """A user reading `cxrdiff finetune --help` sees the paper's 5e-5, 256 and 0.3 beside --lr, --batch-size and
    --ucg-no-finding; every int/float option shows a default, or its help says what the default is."""
    from typer.core import TyperOption

    missing, shown = [], {}
    for name, command in _commands():
        for param in command.params:
            if (
                not isinstance(param, TyperOption)
                or param.required
                or _type_name(param) not in ("int", "integer", "float")
            ):
                continue
            text = param.show_default if isinstance(param.show_default, str) else None
            if text is None and param.default is not None and param.show_default:
                text = str(param.default)
            shown[f"{name} --{param.name}"] = text
            if text is None and "default" not in (param.help or "").lower():
                missing.append(f"{name} --{param.name}")
    assert not missing, missing
    assert shown["finetune --lr"] == "5e-05" and shown["finetune --batch_size"] == "256"
    assert shown["finetune --ucg_no_finding"] == "0.3" and shown["model pretrain-text --steps"] == "600"


def test_help_renders_the_config_default():
    result = run("finetune", "--help", env={"COLUMNS": "200", "PATH": ""})
    line = next(x for x in result.stdout.splitlines() if "--lr " in x)
    assert "5e-05" in line, line


@pytest.mark.parametrize("command", sorted(STEPS))
def test_help_defaults_are_the_configs(command):
    """`--help` reads the defaults from the config's source (no import); they equal the dataclass's own."""
    import dataclasses
    import importlib

    from cxrdiff.cli import STEP_CONFIGS
    from cxrdiff.config import config_defaults

    module_name, _, class_name = STEPS[command]
    config_class = getattr(importlib.import_module(module_name), class_name)
    fields = {
        f.name: f.default for f in dataclasses.fields(config_class) if f.default not in (None, dataclasses.MISSING)
    }
    file, name = STEP_CONFIGS[command.split()[-1]]
    assert config_defaults(ROOT / "cxrdiff" / file, name) == fields
