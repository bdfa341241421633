"""`report --emit-jobs`: the sample/ground commands of every sub-folder, which, once run, the report reuses as is."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cxrdiff.artifacts import manifest_hash
from cxrdiff.report import ReportConfig, report
from cxrdiff.report.steps import default_steps, ground_folders, sample_folders

ROOT = Path(__file__).resolve().parents[1]


def _config(tiny_model, prepared, out, **kw) -> ReportConfig:
    small = dict(n_fid=3, diversity_prompts=1, sample_steps=2, ground_steps=2, ground_window=1, ground_limit=3)
    return ReportConfig(runs=(tiny_model,), real=prepared, out=out, **(small | kw))


def test_emitted_commands_name_every_sub_folder(tiny_model, phantom_prepared, tmp_path):
    out, jobs = tmp_path / "report", tmp_path / "jobs.txt"
    result = report(_config(tiny_model, phantom_prepared, out, emit_jobs=jobs))
    lines = jobs.read_text().splitlines()
    assert result == {"jobs": len(lines), "file": str(jobs)}
    outs = [Path(shlex.split(line)[shlex.split(line).index("--out") + 1]) for line in lines]
    runs = out / "runs" / tiny_model.name
    assert outs[:3] == [runs / "samples", runs / "diversity", runs / "ground"]
    assert outs[3:] in ([runs / "samples-ms-cxr", runs / "diversity-ms-cxr"],
                        [runs / "ground-per-phrase", runs / "samples-ms-cxr", runs / "diversity-ms-cxr"])  # fmt: skip
    first = shlex.split(lines[0])
    assert first[:2] == ["cxrdiff", "sample"] and first[first.index("--limit") + 1] == "3"
    assert first[first.index("--prompts") + 1] == str(phantom_prepared / "test.parquet")
    assert "--n-per-prompt" not in first  # the default (1) is not written
    assert shlex.split(lines[1])[shlex.split(lines[1]).index("--n-per-prompt") + 1] == "4"
    assert not out.exists()  # nothing run, nothing claimed


@pytest.mark.slow
def test_a_later_report_reuses_what_the_emitted_commands_made(tiny_model, phantom_prepared, tmp_path):
    out, jobs = tmp_path / "report", tmp_path / "jobs.txt"
    config = _config(tiny_model, phantom_prepared, out, table4_p19_only=True)
    report(_config(tiny_model, phantom_prepared, out, table4_p19_only=True, emit_jobs=jobs))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for line in jobs.read_text().splitlines():  # what each array task would run
        args = shlex.split(line)
        proc = subprocess.run([sys.executable, "-m", "cxrdiff", *args[1:]], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
    runs = out / "runs" / tiny_model.name
    made = {p: manifest_hash(p) for p in runs.iterdir()}
    assert all(made.values()) and len(made) >= 3
    done: list[str] = []  # the report's own sub-step code, with the real steps: nothing to recompute
    sample_folders(config, tiny_model, runs, phantom_prepared, default_steps(), done)
    ground_folders(config, tiny_model, runs, phantom_prepared, default_steps(), done)
    assert done == [] and {p: manifest_hash(p) for p in runs.iterdir()} == made


SMALL_TOML = """
n_fid = 3
diversity_prompts = 1
sample_steps = 2
ground_steps = 2
ground_window = 1
ground_limit = 3
random_features = true
no_privacy = true
memorization_prompts = 0
table4_p19_only = true
resamples = 200
fd_resamples = 5
"""


@pytest.mark.slow
def test_report_under_a_launcher_two_ranks_equals_one_process(tiny_model, phantom_prepared, tmp_path):
    """torchrun with 2 gloo processes: rank 0 claims --out and measures, both share the sub-steps; the images
    are one process's, byte for byte, and so are the numbers (grounding to float rounding)."""
    import json

    (tmp_path / "small.toml").write_text(SMALL_TOML)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    args = ["report", str(tiny_model), "--real", str(phantom_prepared), "--config", str(tmp_path / "small.toml")]
    one = subprocess.run([sys.executable, "-m", "cxrdiff", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cxrdiff"]
    two = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("report: ") == 1  # one result, the main process's
    assert "[rank 1/2]" in two.stderr  # the other rank made its share of the images, and says so
    name = tiny_model.name
    for folder in ("samples", "diversity"):
        ours, theirs = tmp_path / "two" / "runs" / name / folder, tmp_path / "one" / "runs" / name / folder
        pngs = sorted(p.name for p in theirs.glob("*.png"))
        assert pngs and all((ours / p).read_bytes() == (theirs / p).read_bytes() for p in pngs)
    got, want = (json.loads((tmp_path / d / "metrics.json").read_text())["runs"][name] for d in ("two", "one"))
    assert _close(got["fidelity"], want["fidelity"]) and _close(got["diversity"], want["diversity"])
    assert want["grounding"]["average"] and _close(got["grounding"]["average"], want["grounding"]["average"])


def _close(got, want) -> bool:
    """Equal, numbers to 1e-4 relative (another process may round a float32 sum differently)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(_close(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_close, got, want))
    if isinstance(want, float) and isinstance(got, float):
        return got == pytest.approx(want, rel=1e-4, abs=1e-6, nan_ok=True)
    return got == want
