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


def test_not_implemented_command_exits_2(monkeypatch):
    from cxrdiff import cli
    from cxrdiff.errors import NotImplementedYet

    with pytest.raises(NotImplementedYet, match="not implemented yet"):
        cli._call("no_such_step", "run")


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
