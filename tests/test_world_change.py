"""`finetune --allow-world-change`: a run checkpointed by one process resumes under two (torch's launcher, gloo on
the CPU); the global data order continues at the next sample, and without the flag the resume is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_prepared import build_prepared

from cxrdiff.errors import InputError
from cxrdiff.finetune import Checkpoints

ROOT = Path(__file__).resolve().parents[1]

# Runs cxrdiff with TrainData.micro_batch recording, per rank, the rows each micro-step consumed.
SPY = """
import json, os, runpy, sys
from cxrdiff.finetune.data import TrainData
real = TrainData.micro_batch
def spy(self, step, micro, per_device, batch_size):
    rows, latents = real(self, step, micro, per_device, batch_size)
    with open(os.environ["ROWS_FILE"], "a") as f:
        f.write(json.dumps({"rank": self.rank, "step": step, "rows": rows.tolist()}) + "\\n")
    return rows, latents
TrainData.micro_batch = spy
sys.argv = ["cxrdiff", *sys.argv[1:]]
runpy.run_module("cxrdiff", run_name="__main__")
"""


def _run(tmp_path: Path, processes: int, args: list[str], rows: str) -> subprocess.CompletedProcess:
    """`cxrdiff ARGS` in 1 process, or in 2 under torch's launcher (gloo; `accelerate launch --cpu` starts only
    one); the rows every micro-step consumed go to tmp_path/ROWS, each rank's exit code to tmp_path/exit-codes."""
    (tmp_path / "spy.py").write_text(SPY)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CI": "1", "ACCELERATE_USE_CPU": "true"}
    env |= {"ROWS_FILE": str(tmp_path / rows), "CXRDIFF_EXIT_FILE": str(tmp_path / "exit-codes")}
    (tmp_path / "exit-codes").unlink(missing_ok=True)
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return subprocess.run([*launch, str(tmp_path / "spy.py"), *args], capture_output=True, text=True, timeout=400,
                          env=env)  # fmt: skip


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_one_process_run_resumes_under_two_with_the_flag_and_the_data_continues(tmp_path, tiny_model):
    from cxrdiff.models import vae_fingerprint

    prepared = build_prepared(tmp_path / "prepared", vae_fingerprint=vae_fingerprint(tiny_model))
    out = tmp_path / "run"
    args = ["finetune", "--data", str(prepared), "--base-model", str(tiny_model), "--out", str(out), "--frozen-text",
            "--steps", "4", "--batch-size", "4", "--per-device-batch-size", "2", "--log-every", "1"]  # fmt: skip
    (tmp_path / "drill.toml").write_text("stop_after_step = 2\n")
    first = _run(tmp_path, 1, [*args, "--config", str(tmp_path / "drill.toml")], "rows-1.jsonl")
    assert first.returncode == 75 and "stopped by a signal after step 2" in first.stderr, first.stderr[-2000:]
    state = json.loads((out / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert (state["step"], state["samples_seen"], state["processes"]) == (2, 8, 1)

    refused = _run(tmp_path, 2, args, "rows-2.jsonl")
    assert (tmp_path / "exit-codes").read_text().split() == ["2", "2"]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors and errors[0] == (
        f"error: --out {out}: checkpoints from 1 processes, now 2; resume with as many, "
        "or pass --allow-world-change (docs/slurm.md: what differs)"
    )
    assert not _rows(tmp_path / "rows-2.jsonl") and not (out / "manifest.json").exists()

    resumed = _run(tmp_path, 2, [*args, "--allow-world-change"], "rows-2.jsonl")
    assert resumed.returncode == 0, [line for line in resumed.stderr.splitlines() if "error" in line.lower()][:8]
    assert "resuming a checkpoint of 1 processes with 2 (--allow-world-change)" in resumed.stderr
    assert "ranks without saved generators (1)" in resumed.stderr
    assert [r["step"] for r in _rows(out / "train_log.jsonl")] == [1, 2, 3, 4]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["steps"] == 4
    # sample g of the run is row perm[g] (24 rows, one epoch, seed 0): one process takes g = 4·step + 2·micro + k,
    # rank r of 2 takes g = 4·step + r + 2k
    perm = np.random.default_rng([0, 0]).permutation(24)
    assert _rows(tmp_path / "rows-1.jsonl") == [
        {"rank": 0, "step": s, "rows": perm[4 * s + 2 * m : 4 * s + 2 * m + 2].tolist()} for s in (0, 1) for m in (0, 1)
    ]
    after = _rows(tmp_path / "rows-2.jsonl")
    assert sorted((r["step"], r["rank"]) for r in after) == [(2, 0), (2, 1), (3, 0), (3, 1)]
    for r in after:
        assert r["rows"] == perm[4 * r["step"] + r["rank"] : 4 * r["step"] + 4 : 2].tolist(), r


def test_a_world_change_keeps_the_global_batch_or_is_refused(tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "step-0000002"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"step": 2, "samples_seen": 8, "processes": 1}))
    checkpoints = Checkpoints(tmp_path / "run")
    assert checkpoints.check(4, processes=1) is None
    with pytest.raises(InputError, match="checkpoints from 1 processes, now 2; .* --allow-world-change"):
        checkpoints.check(4, processes=2)
    assert checkpoints.check(4, processes=2, world_change=4) == 1
    with pytest.raises(InputError, match=r"samples_seen 8 is not step 2 × the global batch 8"):
        checkpoints.check(4, processes=2, world_change=8)
