"""`cxrdiff doctor`: what is missing, where it goes, and the exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxrdiff.doctor import doctor
from cxrdiff.metrics.fid import INCEPTION_FILE, XRV_FILE


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    env = {"HOME": str(tmp_path / "home"), "TORCH_HOME": str(tmp_path / "torch"), "CUDA_VISIBLE_DEVICES": ""}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_missing_weights_say_where_they_go(empty_home, tmp_path):
    out = doctor()
    assert out["ok"] is False and out["missing"] == 2
    assert out["inception_weights"].startswith("MISSING") and INCEPTION_FILE in out["inception_weights"]
    assert str(Path(empty_home["TORCH_HOME"]) / "hub" / "checkpoints") in out["inception_weights"]
    assert out["xrv_weights"].startswith("MISSING") and ".torchxrayvision" in out["xrv_weights"]
    assert out["base_model"].startswith("note: not checked")
    assert out["cuda"].startswith("note: no CUDA")


def test_all_present_is_ok(empty_home, tmp_path, tiny_model):
    inc, xrv = tmp_path / "inc.pth", tmp_path / "xrv.pt"
    inc.write_bytes(b"x")
    xrv.write_bytes(b"x")
    out = doctor(tiny_model, inc, xrv)
    assert out["ok"] is True and out["missing"] == 0
    assert out["base_model"].startswith("ok") and out["inception_weights"] == f"ok: {inc}"
    # the libraries' own cache folders count too
    cache = Path(empty_home["TORCH_HOME"]) / "hub" / "checkpoints" / INCEPTION_FILE
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"x")
    assert doctor(tiny_model, None, xrv)["inception_weights"] == f"ok: {cache}"


def test_broken_model_folder_is_missing(empty_home, tmp_path, tiny_model):
    out = doctor(tmp_path / "nope")
    assert out["base_model"].startswith("MISSING") and "model folder not found" in out["base_model"]
    assert out["missing"] == 3


def _cli(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "cxrdiff", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_cli_exit_codes(empty_home, tmp_path):
    missing = _cli("--json", "doctor", env=empty_home)
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["missing"] == 2
    inc, xrv = tmp_path / "inc.pth", tmp_path / XRV_FILE
    inc.write_bytes(b"x")
    xrv.write_bytes(b"x")
    ok = _cli("doctor", "--inception-weights", str(inc), "--xrv-weights", str(xrv), env=empty_home)
    assert ok.returncode == 0, ok.stderr
    assert f"inception_weights: ok: {inc}" in ok.stdout


@pytest.mark.slow
def test_distributed_checks_under_accelerate_two_cpu_processes(tmp_path):
    """All-reduce of ranks 1 + 2 = 3, a barrier, and rank 1 refused the folder rank 0 claimed in --out (gloo)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path / "home")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    # two real processes (`accelerate launch --cpu` starts one, whatever --num_processes says)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cxrdiff"]
    args = ["--json", "doctor", "--distributed", "--out", str(tmp_path), "--dist-timeout", "60"]
    proc = subprocess.run([*launch, *args], capture_output=True, text=True, timeout=300, env=env)
    printed = json.loads(proc.stdout[proc.stdout.index("{") :])  # one result: the main process's
    assert proc.stdout.count('"distributed_locks"') == 1
    assert printed["distributed_processes"].startswith("ok: 2 processes, backend gloo")
    assert printed["distributed_all_reduce"] == "ok: sum of ranks 1..2 = 3 (expected 3)"
    assert printed["distributed_barrier"].startswith("ok: ") and "timeout 60 s" in printed["distributed_barrier"]
    assert printed["distributed_locks"] == f"ok: {tmp_path}: 1 of 1 other ranks refused the main's claim"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"] or not list(tmp_path.glob(".cxrdiff-doctor*"))
