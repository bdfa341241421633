"""Every step owns its --out the same way, through the CLI: a stranger's folder and another step's folder are
refused, a finished run with the same settings does nothing, other settings are refused (naming them), and
an unfinished run resumes with the same settings and is refused with others. (report re-renders its own
folder when its settings change: everything it shows is cached per step folder.)"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from cxrdiff.artifacts import CLAIM, MANIFEST, write_manifest

STEPS = ("phantom", "prepare", "finetune", "sample", "ground", "report")


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`cxrdiff ARGV` in this process, as the console script runs it: (exit code, stdout, stderr)."""
    from cxrdiff.cli import main

    capsys.readouterr()
    old = sys.argv
    sys.argv = ["cxrdiff", *argv]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def inputs(phantom_tree, phantom_prepared, tiny_model, tmp_path_factory):
    """Each step's argv for an output folder, in two variants that differ in one setting, and the setting's
    name with its two values as a refusal names them; plus a file the step writes (removed to fake a kill)."""
    config = tmp_path_factory.mktemp("report-config") / "report.toml"
    config.write_text("sample_steps = 2\nground_steps = 2\nground_window = 1\nground_limit = 1\nbatch_size = 4\n")
    csv = phantom_tree / "MS_CXR_Local_Alignment_v1.0.0.csv"
    model, prepared, ms_cxr = str(tiny_model), str(phantom_prepared), str(phantom_prepared / "ms_cxr.parquet")
    return {
        "phantom": (
            lambda out, v: ["phantom", str(out), *f"--patients 3 --size 64 --seed {v} --workers 0".split()],
            "seed 0 → 1",
            "mimic-cxr-2.0.0-metadata.csv.gz",
        ),
        "prepare": (
            lambda out, v: ["prepare", "--mimic", str(phantom_tree), "--ms-cxr", str(csv), "--base-model", model,
                            "--out", str(out), *f"--test-size {3 + v} --batch-size 8 --workers 0".split(),
                            "--test-no-finding-max", "0.34"],
            "test_size 3 → 4",
            "test.parquet",
        ),
        "finetune": (
            lambda out, v: ["finetune", "--data", prepared, "--base-model", model, "--out", str(out),
                            *f"--frozen-text --steps 2 --batch-size 4 --lr {1 + v}e-3 --checkpoint-every 1".split()],
            "lr 0.001 → 0.002",
            "unet/diffusion_pytorch_model.safetensors",
        ),
        "sample": (
            lambda out, v: ["sample", "--model", model, "--prompt", "small left effusion", "--out", str(out),
                            *f"--n-per-prompt 2 --steps {2 + v}".split()],
            "steps 2 → 3",
            "000001.png",
        ),
        "ground": (
            lambda out, v: ["ground", "--model", model, "--data", ms_cxr, "--out", str(out),
                            *f"--steps 3 --window {2 + v} --limit 2".split()],
            "window 2 → 3",
            "scores.parquet",
        ),
        "report": (
            lambda out, v: ["report", model, "--real", prepared, "--out", str(out), "--config", str(config),
                            *f"--random-features --n-fid {2 + v} --diversity-prompts 1".split()],
            "n_fid 2 → 3",
            "report.md",
        ),
    }  # fmt: skip


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
    """A finished run of a step (made once per step, on first use); tests copy it before changing it."""
    made: dict[str, Path] = {}

    def get(step: str, capsys) -> Path:
        if step not in made:
            out = tmp_path_factory.mktemp(f"finished-{step}") / "out"
            code, _, err = cli(inputs[step][0](out, 0), capsys)
            assert code == 0, err
            assert (out / MANIFEST).is_file() and not (out / CLAIM).exists()
            made[step] = out
        return made[step]

    return get


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_refuses_a_strangers_folder_and_another_steps(step, inputs, tmp_path, capsys):
    argv = inputs[step][0]
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    code, _, err = cli(argv(stranger, 0), capsys)
    assert code == 2
    assert f"not empty and not a '{step}' folder (has notes.txt)" in _one_error_line(err)
    assert sorted(p.name for p in stranger.iterdir()) == ["notes.txt"]

    other = tmp_path / "other"
    kind = "sample" if step != "sample" else "ground"
    write_manifest(other, kind)
    code, _, err = cli(argv(other, 0), capsys)
    assert code == 2
    assert f"this is a '{kind}' folder, expected '{step}'" in _one_error_line(err)
    assert sorted(p.name for p in other.iterdir()) == [MANIFEST]


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_finished_run_same_settings_does_nothing_other_settings_refused(step, inputs, finished, tmp_path, capsys):
    argv, changed, _ = inputs[step]
    out = tmp_path / "out"
    shutil.copytree(finished(step, capsys), out)
    manifest = (out / MANIFEST).read_bytes()
    code, stdout, err = cli(["--json", *argv(out, 0)], capsys)
    assert code == 0, err
    if step == "report":  # re-rendered every run, from caches: nothing measured again
        assert set(json.loads(stdout)["recomputed"].values()) == {"nothing"}
    else:
        assert (out / MANIFEST).read_bytes() == manifest  # untouched: later steps' input hashes stay valid

    code, _, err = cli(argv(out, 1), capsys)
    if step == "report":
        assert code == 0, err
        assert json.loads((out / MANIFEST).read_text())["settings"]["n_fid"] == 3
        return
    assert code == 2
    line = _one_error_line(err)
    assert f"holds a finished '{step}' run made with other settings ({changed}" in line, line
    assert (out / MANIFEST).read_bytes() == manifest


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_unfinished_run_resumes_with_same_settings_only(step, inputs, finished, tmp_path, capsys):
    argv, changed, product = inputs[step]
    out = tmp_path / "out"
    shutil.copytree(finished(step, capsys), out)
    manifest = json.loads((out / MANIFEST).read_text())
    # what a killed run leaves: its claim, some outputs, no manifest
    claim = {"step": step, "key": manifest["settings_key"], "settings": manifest["settings"]}
    (out / CLAIM).write_text(json.dumps(claim))
    (out / MANIFEST).unlink()
    (out / product).unlink()

    code, _, err = cli(argv(out, 1), capsys)
    if step == "report":
        assert code == 0, err  # taken over with the other settings, then back below
    else:
        assert code == 2
        line = _one_error_line(err)
        assert f"holds an unfinished '{step}' run made with other settings ({changed}" in line, line
        assert not (out / MANIFEST).exists() and not (out / product).exists()

    code, _, err = cli(argv(out, 0), capsys)
    assert code == 0, err
    assert (out / product).is_file() and (out / MANIFEST).is_file() and not (out / CLAIM).exists()
    assert json.loads((out / MANIFEST).read_text())["settings_key"] == manifest["settings_key"]
