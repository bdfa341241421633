"""Two processes never write one `--out` folder: the claim is created whole and exclusively, and a claim held
by a running process is refused whatever its settings; a killed run's claim is resumed (same settings),
refused (other settings, outputs written) or taken (nothing written yet)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cxrdiff.artifacts import CLAIM, MANIFEST, InUse, OtherSettings, StepFolder, settings_key, write_json
from cxrdiff.errors import InputError

ROOT = Path(__file__).resolve().parents[1]

# A claimer: waits for the start file, claims, writes a file a moment later, then holds the folder until
# the stop file appears.
CLAIMER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from cxrdiff.artifacts import StepFolder
    from cxrdiff.errors import InputError
    out, steps, start, stop = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    while not start.exists():
        time.sleep(0.0005)
    try:
        folder = StepFolder.claim(out, "sample", {"steps": steps})
    except InputError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    time.sleep(0.3)  # as a step loads its model before it writes: only the claim is there meanwhile
    (out / f"image-{steps}-{os.getpid()}.png").write_bytes(b"x")
    print("claimed", flush=True)
    while not stop.exists():
        time.sleep(0.005)
    if sys.argv[5] == "finish":
        folder.finish({})
    """
)


def _claimers(tmp_path, out, steps, end="finish"):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start, stop = tmp_path / "start", tmp_path / "stop"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(out), str(s), str(start), str(stop), end],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for s in steps
    ]
    return procs, start, stop


@pytest.mark.parametrize("steps", [(40, 5), (40, 40)], ids=["other settings", "same settings"])
def test_processes_claiming_one_folder_at_once_one_proceeds_the_others_are_refused(tmp_path, steps):
    for round_ in range(4):
        out = tmp_path / f"out-{round_}"
        procs, start, stop = _claimers(tmp_path / f"r{round_}", out, steps)
        (tmp_path / f"r{round_}").mkdir()
        time.sleep(0.5)  # every claimer is waiting at the barrier
        start.touch()
        deadline = time.monotonic() + 30
        while sum(p.poll() is not None for p in procs) < len(procs) - 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # the refused ones exit while the winner still holds the folder
        stop.touch()
        results = [(p.wait(timeout=30), *p.communicate()) for p in procs]
        winners = [i for i, (code, _, _) in enumerate(results) if code == 0]
        assert len(winners) == 1, results
        winner = procs[winners[0]]
        for i, (code, stdout, stderr) in enumerate(results):
            if i == winners[0]:
                assert stdout == "claimed\n", stderr
                continue
            assert code == 2 and stdout == "" and len(stderr.splitlines()) == 1, (code, stdout, stderr)
            assert f"--out {out}: in use by process {winner.pid} on " in stderr, stderr
            if steps[0] != steps[1]:
                assert f"a 'sample' run with other settings (steps {steps[winners[0]]} → {steps[i]})" in stderr
            else:
                assert "a 'sample' run with these settings; let it finish" in stderr
        # never mixed: the one image is the winner's, under its manifest
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["settings"] == {"steps": steps[winners[0]]}
        assert sorted(p.name for p in out.iterdir()) == [f"image-{steps[winners[0]]}-{winner.pid}.png", MANIFEST]


def _held_by_a_child(tmp_path, out, steps, kill=False):
    """A child process that has claimed `out` (and written one file) and still holds it; killed with SIGKILL
    when `kill`."""
    procs, start, stop = _claimers(tmp_path, out, [steps], end="keep")
    start.touch()
    proc = procs[0]
    assert proc.stdout.readline() == "claimed\n", proc.stderr.read()
    if kill:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return proc, stop


def test_a_live_claim_is_refused_even_with_nothing_written_and_only_checked_with_create_false(tmp_path):
    out = tmp_path / "out"
    proc, stop = _held_by_a_child(tmp_path, out, 40)
    try:
        (out / f"image-40-{proc.pid}.png").unlink()  # only the live claim is left: still not free
        with pytest.raises(InUse, match=rf"in use by process {proc.pid} on .*other settings \(steps 40 → 5\)"):
            StepFolder.claim(out, "sample", {"steps": 5})
        with pytest.raises(InUse, match=rf"in use by process {proc.pid} on .*, an unfinished 'sample' run"):
            StepFolder.claim(out, "ground", {})
        # a claim that is being finished by its owner, or a report taking over: refused all the same
        with pytest.raises(InUse):
            StepFolder.claim(out, "sample", {"steps": 5}, take_over=True)
        # check only (what an accelerate run's other processes do after their main process claimed)
        assert StepFolder.claim(out, "sample", {"steps": 40}, create=False).state == "new"
        assert json.loads((out / CLAIM).read_text())["pid"] == proc.pid  # untouched
    finally:
        stop.touch()
        proc.wait(timeout=30)


def test_a_killed_runs_claim_resumes_with_its_settings_and_is_refused_with_others(tmp_path):
    out = tmp_path / "out"
    proc, _ = _held_by_a_child(tmp_path, out, 40, kill=True)
    with pytest.raises(
        OtherSettings, match=r"holds an unfinished 'sample' run made with other settings \(steps 40 → 5"
    ):
        StepFolder.claim(out, "sample", {"steps": 5})
    folder = StepFolder.claim(out, "sample", {"steps": 40})
    assert folder.state == "resume"
    claim = json.loads((out / CLAIM).read_text())
    assert claim["pid"] == os.getpid() and claim["settings"] == {"steps": 40}
    # now this process holds it: another process is refused
    code = f"from cxrdiff.artifacts import StepFolder; StepFolder.claim({str(out)!r}, 'sample', {{'steps': 40}})"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert done.returncode != 0 and f"in use by process {os.getpid()} on " in done.stderr
    folder.finish({})
    assert not (out / CLAIM).exists() and StepFolder.claim(out, "sample", {"steps": 40}).finished


def test_a_killed_runs_claim_with_nothing_written_may_be_taken_with_other_settings(tmp_path):
    out = tmp_path / "out"
    proc, _ = _held_by_a_child(tmp_path, out, 40, kill=True)
    (out / f"image-40-{proc.pid}.png").unlink()
    folder = StepFolder.claim(out, "sample", {"steps": 5})
    assert folder.state == "new" and json.loads((out / CLAIM).read_text())["settings"] == {"steps": 5}


def test_a_claim_from_before_pids_counts_as_a_killed_run(tmp_path):
    out = tmp_path / "out"
    write_json(out / CLAIM, {"step": "sample", "key": settings_key({}), "settings": {}})
    (out / "a.png").write_bytes(b"x")
    assert StepFolder.claim(out, "sample", {}).state == "resume"


def test_the_report_never_removes_a_step_folder_that_a_running_process_holds(tmp_path):
    from cxrdiff.report.steps import run_step

    out = tmp_path / "runs" / "a" / "samples"
    proc, stop = _held_by_a_child(tmp_path, out, 40)
    try:
        with pytest.raises(InUse):
            run_step("samples", lambda config: StepFolder.claim(config.out, "sample", {"steps": 5}),
                     type("C", (), {"out": out})(), [])  # fmt: skip
        assert (out / f"image-40-{proc.pid}.png").is_file()
    finally:
        stop.touch()
        proc.wait(timeout=30)


def test_a_claim_file_that_is_not_json_is_refused_with_one_line(tmp_path):
    (tmp_path / CLAIM).write_text("{")
    with pytest.raises(InputError, match=r"\.cxrdiff-claim\.json: unreadable; delete it if the folder is yours"):
        StepFolder.claim(tmp_path, "sample", {})


@pytest.mark.slow
def test_two_sample_commands_on_one_folder_one_runs_the_other_is_refused(tiny_model, tmp_path):
    """The issue's case: `sample` with 40 and with 5 steps started together on one --out."""
    import pandas as pd

    out = tmp_path / "samples"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(steps):
        argv = ["sample", "--model", tiny_model, "--out", out, "--prompt", "small left pleural effusion",
                "--n-per-prompt", "4", "--batch-size", "1", "--steps", str(steps)]  # fmt: skip
        return subprocess.Popen([sys.executable, "-m", "cxrdiff", *map(str, argv)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip

    procs = {40: start(40), 5: start(5)}
    results = {steps: (p.wait(timeout=300), *p.communicate()) for steps, p in procs.items()}
    assert sorted(code for code, _, _ in results.values()) in ([0, 2], [0, 75]), results
    winner = next(steps for steps, (code, _, _) in results.items() if code == 0)
    code, _, err = results[5 if winner == 40 else 40]
    line = err.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: --out "), err
    # busy (75: a scheduler retries later) while the winner runs; other settings (2) once it has finished
    assert ("in use by process" in line and code == 75) or ("made with other settings" in line and code == 2), line
    manifest = json.loads((out / MANIFEST).read_text())
    table = pd.read_parquet(out / "samples.parquet")
    assert manifest["settings"]["steps"] == winner and table["steps"].tolist() == [winner] * 4
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(4)]


def test_the_report_verifies_a_finished_step_folder_before_reusing_it(tmp_path, caplog):
    """A finished sample folder whose samples.parquet was cut ("up to date", then ArrowInvalid before): made
    again, saying which file was damaged; a step that keeps writing a damaged file is named, with the folder
    to delete."""
    import pandas as pd

    from cxrdiff.report.steps import run_step

    out = tmp_path / "runs" / "a" / "samples"
    calls = []

    def step(config, cut=False):
        folder = StepFolder.claim(config.out, "sample", {"steps": 5})
        if folder.finished:
            return
        calls.append(1)
        pd.DataFrame({"index": [0, 1]}).to_parquet(config.out / "samples.parquet")
        folder.finish(config={}, files=["samples.parquet"])
        if cut:
            table = config.out / "samples.parquet"
            table.write_bytes(table.read_bytes()[:-20] + bytes(20))  # same size, footer gone

    config = type("C", (), {"out": out})()
    done: list[str] = []
    run_step("samples", step, config, done)
    table = out / "samples.parquet"
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        run_step("samples", step, config, done)
    assert f"{table}: " in caplog.text and "making samples in" in caplog.text
    assert len(calls) == 2 and done == ["samples", "samples"]
    assert pd.read_parquet(table)["index"].tolist() == [0, 1]
    other = tmp_path / "runs" / "b" / "samples"
    with pytest.raises(
        InputError, match=rf"^{other / 'samples.parquet'}: not a readable Parquet file .*; delete {other} and"
    ):
        run_step("samples", lambda c: step(c, cut=True), type("C", (), {"out": other})(), [])
