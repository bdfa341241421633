"""The SLURM pipeline (`scripts/pipeline.sh`) under a real SLURM on this machine (`.ci/slurm-up` starts one):
prepare and sample as 2-task arrays, ground, report; one sample task stopped by `scancel --batch --signal=TERM`
exits 75 and is requeued, resumes, and every output equals one process's."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from cxrdiff.artifacts import MANIFEST, read_manifest
from cxrdiff.ground import GroundConfig, ground
from cxrdiff.sample import SampleConfig, sample

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
PREPARE_ARGS = "--test-size 8 --test-no-finding-max 0.25 --batch-size 8 --shard-size 16 --workers 0"  # = conftest's
SAMPLE = dict(limit=3, n_per_prompt=3, steps=4, batch_size=1)
GROUND = dict(steps=2, window=1, limit=3, batch_size=2)  # 2 batches: one per array task
# slurmd refuses a job credential made in the same second as the revocation of the job's previous run ("Job
# credential revoked"): a requeued job started at once can be killed so; wait this long first
REVOKED_CREDENTIAL_S = 3
REPORT_TOML = """
n_fid = 4
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


def _slurm_ready() -> str | None:
    """Why the test cannot run here (None when it can)."""
    if shutil.which("sbatch") is None:
        return "sbatch not installed (`.ci/slurm-up` installs and starts a one-node SLURM as root)"
    try:
        state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if state.returncode != 0 or state.stdout.strip() not in ("idle", "mixed", "allocated"):
        return f"no SLURM node up (sinfo: {state.stdout.strip() or state.stderr.strip()}); run .ci/slurm-up"
    return None


def _flags(options: dict) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items())


def _squeue(job: str) -> list[tuple[str, str, str]]:
    """(task id, state, restarts) of an array's tasks still known to SLURM."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], capture_output=True, text=True).stdout
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]


def _stop_and_requeue(work: Path, ids: dict, log: list) -> None:
    """When sample task 1 has made its first image: SIGTERM to its batch shell, then, once run-step.sh has
    requeued it (exit 75) and it is PENDING, start it now (SLURM otherwise waits 120 s after a requeue)."""
    deadline = time.monotonic() + 400
    while "sample" not in ids and time.monotonic() < deadline:
        time.sleep(0.2)
    task = f"{ids['sample']}_1"
    while not (work / "samples" / "000001.png").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    subprocess.run(["scancel", "--batch", "--signal=TERM", task], check=True)
    log.append(("signalled", len(list((work / "samples").glob("*.png")))))
    while time.monotonic() < deadline:
        states = dict(_squeue(task))
        state = next(iter(states.values()), None)
        if state == "PENDING":
            time.sleep(REVOKED_CREDENTIAL_S)
            subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=True)
            log.append(("restarted", time.monotonic()))
            return
        time.sleep(0.3)


@pytest.mark.slow
def test_pipeline_under_slurm_equals_one_process(phantom_tree, phantom_prepared, tiny_model, tmp_path):
    why = _slurm_ready()
    if why:
        pytest.skip(why)
    work = tmp_path / "work"
    report_toml = tmp_path / "report.toml"  # a small report: what matters here is that it runs as a job
    report_toml.write_text(REPORT_TOML)
    import torch

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        # the jobs compute at the threads of this process, which makes the one-process references (float
        # kernels differ between 1 and 2 threads)
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "CI": "1",
        "CXRDIFF": f"{sys.executable} -m cxrdiff",
        "MIMIC": str(phantom_tree),
        "BASE_MODEL": str(tiny_model),
        "MODEL": str(tiny_model),
        "WORK": str(work),
        "TASKS": "2",
        "WAIT": "1",
        "PREPARE_ARGS": f"--ms-cxr {phantom_tree / 'MS_CXR_Local_Alignment_v1.0.0.csv'} {PREPARE_ARGS}",
        "SAMPLE_ARGS": _flags(SAMPLE),
        "GROUND_ARGS": _flags(GROUND),
        "REPORT_ARGS": f"--config {report_toml}",
        "SBATCH_ARGS": "--cpus-per-task=1 --time=00:15:00",
    }
    start = time.monotonic()
    pipeline = subprocess.Popen(
        [str(SCRIPTS / "pipeline.sh")], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    ids: dict[str, str] = {}
    events: list = []
    stopper = threading.Thread(target=_stop_and_requeue, args=(work, ids, events), daemon=True)
    stopper.start()
    for line in pipeline.stdout:  # "NAME ID" per job, as each is submitted (the report's when it has ended)
        name, job = line.split()
        ids[name] = job
    code = pipeline.wait(timeout=900)
    stopper.join(timeout=60)
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("*.out")}
    assert code == 0, (pipeline.stderr.read(), logs)
    print(f"pipeline under SLURM: {time.monotonic() - start:.0f} s; {events}")

    # `sbatch --wait` says 0 for a job cancelled before it ran: the outputs themselves are the evidence
    for step, folder in [("prepare", "prepared"), ("sample", "samples"), ("ground", "ground"), ("report", "report")]:
        assert read_manifest(work / folder, step)["step"] == step
    task_1 = logs[f"cxrdiff-sample-{ids['sample']}_1.out"]  # --open-mode=append: both runs of the task
    assert "cxrdiff step exit 75" in task_1 and "restart 0)" in task_1, task_1
    assert "cxrdiff step exit 0" in task_1 and "restart 1)" in task_1, task_1
    assert events[0][0] == "signalled" and events[0][1] < 9 and events[1][0] == "restarted"
    task_0 = logs[f"cxrdiff-sample-{ids['sample']}_0.out"]  # requeueing task 1 left task 0 alone
    assert "DUE TO JOB REQUEUE" not in task_0 and task_0.count("cxrdiff step exit 0") == 1, task_0

    # prepare: two array tasks wrote the units of one process's run
    ours, theirs = work / "prepared", phantom_prepared
    units = sorted(p.name for p in theirs.glob("*.parquet"))
    assert sorted(p.name for p in ours.glob("*.parquet")) == units
    for name in units:
        pd.testing.assert_frame_equal(pd.read_parquet(ours / name), pd.read_parquet(theirs / name))
    assert (ours / "skipped.csv").read_text() == (theirs / "skipped.csv").read_text()
    manifests = [json.loads((f / MANIFEST).read_text()) for f in (ours, theirs)]
    assert manifests[0]["counts"] == manifests[1]["counts"] and manifests[0]["shards"] == manifests[1]["shards"]

    # sample: 2 tasks (one stopped and requeued) = one process, byte for byte
    one = tmp_path / "one-sample"
    sample(SampleConfig(model=tiny_model, out=one, prompts=ours / "test.parquet", **SAMPLE))
    names = sorted(p.name for p in one.glob("*.png"))
    assert sorted(p.name for p in (work / "samples").glob("*.png")) == names and len(names) == 9
    assert all((work / "samples" / n).read_bytes() == (one / n).read_bytes() for n in names)
    pd.testing.assert_frame_equal(
        pd.read_parquet(work / "samples" / "samples.parquet"), pd.read_parquet(one / "samples.parquet")
    )

    # ground: the job's table = one process's
    one_ground = tmp_path / "one-ground"
    ground(GroundConfig(model=tiny_model, out=one_ground, data=ours / "ms_cxr.parquet", **GROUND))
    for table in sorted(p.name for p in one_ground.glob("*.parquet")):
        pd.testing.assert_frame_equal(pd.read_parquet(work / "ground" / table), pd.read_parquet(one_ground / table))
    assert (work / "report" / "report.md").is_file()


def _job_state(job: str) -> str | None:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.split()
    return out[0] if out else None


@pytest.mark.slow
def test_finetune_sbatch_is_stopped_by_slurm_requeued_and_resumes_exactly(phantom_prepared, tiny_model, tmp_path):
    """`scripts/finetune.sbatch` on a GPU-less node: SLURM's SIGTERM reaches the training process through srun
    and accelerate, it saves a checkpoint and exits 75, the script requeues the job, and the resumed run logs
    the same losses as an uninterrupted one."""
    why = _slurm_ready()
    if why:
        pytest.skip(why)
    args = "--steps 60 --batch-size 2 --per-device-batch-size 2 --checkpoint-every 10 --log-every 1"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # accelerate of this interpreter
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "CI": "1",
        "DATA": str(phantom_prepared),
        "BASE_MODEL": str(tiny_model),
        "OUT": str(tmp_path / "run"),
        "FINETUNE_ARGS": args,
    }
    (tmp_path / "logs").mkdir()  # the script's --output folder, as pipeline.sh makes it
    job = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:15:00",
         "--open-mode=append", str(SCRIPTS / "finetune.sbatch")],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    run, deadline = tmp_path / "run", time.monotonic() + 600
    log = tmp_path / "logs" / f"cxrdiff-finetune-{job}.out"
    while not (run / "checkpoints" / "step-0000010" / "state.json").is_file() and time.monotonic() < deadline:
        assert _job_state(job) is not None, log.read_text() if log.is_file() else f"job {job} ended, no log"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)  # to the job's step: srun, as preemption does
    while _job_state(job) != "PENDING" and time.monotonic() < deadline:  # requeued by the script (exit 75)
        time.sleep(0.3)
    time.sleep(REVOKED_CREDENTIAL_S)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)  # not 120 s from now
    while not (run / MANIFEST).is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    log = log.read_text()
    assert (run / MANIFEST).is_file(), log
    assert "stopped by a signal after step" in log and "re-run the same command to resume" in log, log
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 61))
    assert read_manifest(run, "finetune")["steps"] == 60

    one = tmp_path / "one"  # the same run in one uninterrupted process, at the same threads
    done = subprocess.run(
        [sys.executable, "-m", "cxrdiff", "finetune", "--data", str(phantom_prepared), "--base-model",
         str(tiny_model), "--out", str(one), "--frozen-text", "--mixed-precision", "no", *args.split()],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    reference = [json.loads(line) for line in (one / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == [r["loss"] for r in reference]
