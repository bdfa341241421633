"""`--shard I/N|slurm`: shards of one step share one --out (a lock each, one table), compose with accelerate's
ranks, and give the same files as one process; SIGTERM stops a step with exit 75 and the same command resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from cxrdiff.artifacts import CLAIM, MANIFEST, InUse, OtherSettings, StepFolder
from cxrdiff.errors import TEMPFAIL, InputError
from cxrdiff.sample import SampleConfig, sample
from cxrdiff.shards import Shard, label, parse_shard, share

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["small left pleural effusion", "cardiomegaly without edema"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CI": "1"}
for _name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT"):
    ENV.pop(_name, None)


def test_shard_specs_and_slurm_variables():
    assert parse_shard("1/4") == Shard(1, 4) and parse_shard(None) is None and str(Shard(0, 2)) == "0/2"
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert parse_shard("slurm", env) == Shard(2, 3)
    for bad, message in [("4/4", "0 <= I < N"), ("1-4", "expected I/N"), ("a/b", "expected I/N")]:
        with pytest.raises(InputError, match=message):
            parse_shard(bad)
    with pytest.raises(InputError, match="SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_COUNT not set"):
        parse_shard("slurm", {"SLURM_ARRAY_TASK_ID": "0"})
    with pytest.raises(InputError, match="stepped or sparse"):  # --array=0-6:2: IDs 0,2,4,6, count 4
        parse_shard(
            "slurm", {**env, "SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "4"}
        )


def test_task_i_rank_p_takes_share_i_times_p_plus_p():
    # 2 tasks × 2 ranks over 8 images, by hand: task 0 rank 0 → 0,4; rank 1 → 1,5; task 1 rank 0 → 2,6; rank 1 → 3,7
    shares = {(i, p): share(Shard(i, 2), p, 2) for i in range(2) for p in range(2)}
    taken = {key: list(range(s.index, 8, s.count)) for key, s in shares.items()}
    assert taken == {(0, 0): [0, 4], (0, 1): [1, 5], (1, 0): [2, 6], (1, 1): [3, 7]}
    assert share(None, 1, 2) == Shard(1, 2) and share(Shard(1, 3), 0, 1) == Shard(1, 3)
    assert label(Shard(1, 4), 0, 2) == "shard 1/4 rank 0/2" and label(None, 0, 1) == ""


def _hold_part(out: Path, part: str, settings: dict) -> subprocess.Popen:
    """Another process that claims shard `part` of `out` and keeps it until killed."""
    code = (
        "import sys, time; from cxrdiff.artifacts import StepFolder; "
        f"StepFolder.claim({str(out)!r}, 'sample', {settings!r}, part=({part}));"
        "print('held', flush=True); time.sleep(300)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_shards_share_a_folder_each_once_and_a_whole_run_waits(tmp_path):
    out, settings = tmp_path / "out", {"steps": 3}
    other = _hold_part(out, "0, 2", settings)
    try:
        mine = StepFolder.claim(out, "sample", settings, part=(1, 2))  # another shard: side by side
        assert mine.state == "new" and json.loads((out / CLAIM).read_text())["shared"]
        with pytest.raises(InUse, match=r"shard 0/2 is already running \(process \d+") as twice:
            StepFolder.claim(out, "sample", settings, part=(0, 2))
        assert twice.value.exit_code == TEMPFAIL == 75
        with pytest.raises(InUse, match=r"in use by shard\(s\) 0/2 of a sharded run"):
            StepFolder.claim(out, "sample", settings)  # the whole folder, while a shard runs
        with pytest.raises(InUse, match="other settings"):
            StepFolder.claim(out, "sample", {"steps": 4}, part=(1, 2))
        mine.release_part()
    finally:
        other.kill()
        other.wait()
    (out / "000000.png").write_bytes(b"x")  # something written: a later shard resumes
    assert StepFolder.claim(out, "sample", settings, part=(0, 2)).state == "resume"
    with pytest.raises(OtherSettings):
        StepFolder.claim(out, "sample", {"steps": 4}, part=(1, 2))


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cxrdiff", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or ENV,
    )


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    """The reference: one process, 2 prompts × 3 images, 2 steps, 1 thread (as every run here)."""
    folder = tmp_path_factory.mktemp("shards")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    args = ["--model", str(tiny_model), "--prompts-file", str(folder / "prompts.txt"), "--n-per-prompt", "3",
            "--steps", "2", "--batch-size", "1"]  # fmt: skip
    sample(SampleConfig(model=tiny_model, out=folder / "one", prompts_file=folder / "prompts.txt", n_per_prompt=3,
                        steps=2, batch_size=1))  # fmt: skip
    return folder, args


def _same_as_one_process(run, out: Path) -> None:
    folder, _ = run
    names = [f"{i:06d}.png" for i in range(6)]
    assert sorted(p.name for p in out.glob("*.png")) == names
    for name in names:
        assert (out / name).read_bytes() == (folder / "one" / name).read_bytes(), name
    assert (out / MANIFEST).is_file() and not list(out.glob(f"{CLAIM}*"))
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "samples.parquet"), pd.read_parquet(folder / "one" / "samples.parquet")
    )


@pytest.mark.slow
def test_two_array_tasks_at_once_make_one_table(run, tmp_path):
    folder, args = run
    out = tmp_path / "array"
    tasks = []
    for task in (4, 5):  # --array=4-5
        env = {**ENV, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "2"}
        tasks.append(_cli("--json", "sample", *args, "--out", str(out), "--shard", "slurm", env=env))
    results = [(p.wait(timeout=300), *p.communicate()) for p in tasks]
    assert [code for code, _, _ in results] == [0, 0], results
    printed = [json.loads(stdout[stdout.index("{") :]) for _, stdout, _ in results]
    assert sorted(r["generated"] for r in printed) == [3, 3] and any(r["complete"] for r in printed)
    _same_as_one_process(run, out)

    unset = _cli("sample", *args, "--out", str(tmp_path / "x"), "--shard", "slurm")
    code, _, err = unset.wait(timeout=120), *unset.communicate()
    assert code == 2 and err.strip().splitlines() == [
        "error: --shard slurm: SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_COUNT not set "
        "(run it in an `sbatch --array` job)"
    ]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_duplicate_shard_is_refused_with_75_then_finalize(run, tmp_path):
    folder, args = run
    out = tmp_path / "dup"
    first = _cli("sample", *args, "--out", str(out), "--shard", "0/2")
    assert first.wait(timeout=300) == 0, first.communicate()
    settings = json.loads((out / CLAIM).read_text())["settings"]
    holder = _hold_part(out, "1, 2", settings)  # shard 1/2 running elsewhere
    try:
        twice = _cli("sample", *args, "--out", str(out), "--shard", "1/2")
        code, _, err = twice.wait(timeout=120), *twice.communicate()
        assert code == 75 and err.strip().startswith(f"error: --out {out}: shard 1/2 is already running"), err
        early = _cli("sample", *args, "--out", str(out), "--finalize")
        code, _, err = early.wait(timeout=120), *early.communicate()
        assert code == 1 and "3 of 6 images missing; run the missing shards first" in err, err
    finally:
        holder.kill()
        holder.wait()
    second = _cli("sample", *args, "--out", str(out), "--shard", "1/2")
    assert second.wait(timeout=300) == 0, second.communicate()
    _same_as_one_process(run, out)
    again = _cli("sample", *args, "--out", str(out), "--finalize")  # a finished folder: nothing to do
    assert again.wait(timeout=120) == 0, again.communicate()


def _launch(args: list[str], out: Path, *extra: str) -> subprocess.Popen:
    """Two gloo processes under torch's launcher, as `accelerate launch --multi_gpu` starts them (`accelerate
    launch --cpu` starts one process, whatever --num_processes says); each finds its rank through accelerate.
    Each rank appends its exit code to OUT's sibling `exit-codes`."""
    env = {**ENV, "ACCELERATE_USE_CPU": "true", "CXRDIFF_EXIT_FILE": str(out.parent / "exit-codes")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "cxrdiff", "sample", *args, "--out", str(out), *extra]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_accelerate_two_ranks_and_two_shards_by_two_ranks_equal_one_process(run, tmp_path):
    _, args = run
    ranks = _launch(args, tmp_path / "ranks")
    assert ranks.wait(timeout=400) == 0, ranks.communicate()[1][-3000:]
    _same_as_one_process(run, tmp_path / "ranks")
    both = [_launch(args, tmp_path / "grid", "--shard", f"{i}/2") for i in range(2)]  # at once
    codes = [p.wait(timeout=400) for p in both]
    assert codes == [0, 0], [p.communicate()[1][-3000:] for p in both]
    _same_as_one_process(run, tmp_path / "grid")


@pytest.mark.slow
def test_sigterm_stops_with_75_and_the_same_command_resumes(run, tmp_path):
    _, args = run
    out = tmp_path / "stopped"
    proc = _cli("sample", *args, "--out", str(out))
    deadline = time.monotonic() + 240
    while not list(out.glob("*.png")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code, _, err = proc.wait(timeout=120), *proc.communicate()
    made = len(list(out.glob("*.png")))
    assert code == 75, err
    assert err.strip().splitlines()[-1].startswith("error: sample: stopped by SIGTERM after ")
    assert 1 <= made < 6 and not (out / MANIFEST).exists()
    again = _cli("--json", "sample", *args, "--out", str(out))
    code, stdout, err = again.wait(timeout=300), *again.communicate()
    assert code == 0, err
    assert json.loads(stdout[stdout.index("{") :])["skipped"] == made
    _same_as_one_process(run, out)


def test_progress_lines_name_their_process(capsys, monkeypatch):
    from cxrdiff import console

    monkeypatch.setenv("CI", "1")  # plain lines, as in a batch job's log
    monkeypatch.setattr(console, "_label", "")
    list(console.progress(range(2), description="grounding"))
    console.set_label("worker 2")
    list(console.progress(range(2), description="grounding"))
    assert capsys.readouterr().err.splitlines() == [
        "grounding 0/2",
        "grounding 1/2, about 0 s left",
        "[worker 2] grounding 0/2",
        "[worker 2] grounding 1/2, about 0 s left",
    ]


@pytest.mark.slow
def test_two_ranks_stopped_by_sigterm_then_one_process_resumes(run, tmp_path):
    """SIGTERM to torch's launcher reaches both ranks: a rank in its batch loop stops after the batch and writes
    75 to the exit file (one already waiting in a barrier cannot run Python until it is killed); the launcher
    itself exits 1, and the exit file says 75, as run-step.sh reads it. One process then finishes the folder."""
    _, args = run
    out = tmp_path / "stopped"
    env_file = tmp_path / "exit-codes"
    launcher = _launch(args, out)
    deadline = time.monotonic() + 300
    first = [out / "000000.png", out / "000001.png"]  # one of each rank's: both are past their start-up
    while not all(p.is_file() for p in first) and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=120) != 0
    codes = env_file.read_text().split()
    assert "75" in codes and set(codes) <= {"75", "1"}, codes  # what run-step.sh turns into 75 (requeue)
    made = len(list(out.glob("*.png")))
    assert 2 <= made < 6 and not (out / MANIFEST).exists()
    resumed = _cli("sample", *args, "--out", str(out))
    assert resumed.wait(timeout=300) == 0, resumed.communicate()
    _same_as_one_process(run, out)
