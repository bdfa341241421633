"""Manifests and atomic writes."""

import hashlib
import json
import os
import shutil

import pytest

from cxrdiff import __version__
from cxrdiff.artifacts import (
    atomic_dir,
    atomic_path,
    manifest_hash,
    read_manifest,
    write_json,
    write_manifest,
)
from cxrdiff.errors import InputError


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_only_when_complete(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("new")
        raise RuntimeError
    assert target.read_text() == "old"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_atomic_dir(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "w").write_text("x")
        raise ValueError
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("2")
    assert (target / "w").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_dir_writes_through_a_symlinked_target(tmp_path):
    """A model written into a linked --out lands in the link's target (the larger disk), the link stays."""
    disk = tmp_path / "big" / "model"
    disk.mkdir(parents=True)
    link = tmp_path / "model"
    link.symlink_to(disk)
    for text in ("1", "2"):  # a new folder, then a re-save over it
        with atomic_dir(link) as tmp:
            (tmp / "w").write_text(text)
    assert link.is_symlink() and (disk / "w").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "model"]
    assert sorted(p.name for p in (tmp_path / "big").iterdir()) == ["model"]
    with atomic_path(tmp_path / "model" / "f.txt") as tmp:
        tmp.write_text("x")
    assert (disk / "f.txt").read_text() == "x"


def test_what_a_killed_writer_left_is_cleaned_on_the_next_run(tmp_path):
    """A SIGKILL during a save leaves `.NAME.tmp-PID` (and between atomic_dir's renames, only `.NAME.old-PID`):
    the next write removes the first and puts the second back. A live process's temporaries are left alone."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    target = tmp_path / "model"
    (tmp_path / f".model.tmp-{pid}").mkdir()
    (tmp_path / f".model.tmp-{pid}" / "half.safetensors").write_bytes(b"x")
    (tmp_path / f".model.old-{pid}").mkdir()
    (tmp_path / f".model.old-{pid}" / "w").write_text("before")
    (tmp_path / f".model.tmp-{os.getppid()}").mkdir()  # a running process's
    (tmp_path / ".other.tmp-1").mkdir()  # another target's
    with atomic_dir(target) as tmp:  # the old folder is put back first, then replaced as usual
        assert (target / "w").read_text() == "before"
        (tmp / "w").write_text("after")
    assert (target / "w").read_text() == "after"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [f".model.tmp-{os.getppid()}", ".other.tmp-1", "model"]


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),
        OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"),
    ],
)  # the second: pyarrow's
def test_a_full_disk_names_the_path_being_written(tmp_path, error):
    from cxrdiff.errors import path_error

    target = tmp_path / "out" / "train-00000.parquet"
    for writer in (atomic_path, atomic_dir):
        with pytest.raises(OSError) as caught, writer(target):
            raise error
        assert caught.value.errno == 28 and path_error(caught.value) == f"{target}: No space left on device"
    with pytest.raises(OSError) as caught, atomic_path(target):
        raise OSError(13, "Permission denied", "/elsewhere")  # a path already named is kept
    assert caught.value.filename == "/elsewhere"


def test_manifest_round_trip_and_inputs(tmp_path):
    first = tmp_path / "prepared"
    first.mkdir()
    (first / "train-00000.parquet").write_bytes(b"1234")
    write_manifest(first, "prepare", config={"resolution": 64}, seed=3)
    manifest = read_manifest(first, "prepare")
    assert manifest["step"] == "prepare" and manifest["cxrdiff_version"] == __version__
    assert manifest["files"] == {"train-00000.parquet": 4}
    assert manifest["seed"] == 3 and manifest["config"] == {"resolution": 64}

    second = tmp_path / "run"
    second.mkdir()
    write_manifest(second, "finetune", inputs={"data": first})
    recorded = read_manifest(second)["inputs"]["data"]
    assert recorded["manifest_sha256"] == manifest_hash(first)
    assert recorded["path"] == str(first.resolve())


def test_wrong_kind_of_folder_is_refused(tmp_path):
    write_manifest(tmp_path, "sample")
    with pytest.raises(InputError, match=r"this is a 'sample' folder, expected 'prepare'"):
        read_manifest(tmp_path, "prepare")
    with pytest.raises(InputError, match="no manifest.json"):
        read_manifest(tmp_path / "missing" if False else tmp_path.parent, "prepare")
    with pytest.raises(InputError, match="no such folder"):
        read_manifest(tmp_path / "nope", "prepare")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_manifest_hash_changes_with_content(tmp_path):
    write_json(tmp_path / "manifest.json", {"step": "x", "config": {"a": 1}})
    before = manifest_hash(tmp_path)
    write_json(tmp_path / "manifest.json", {"step": "x", "config": {"a": 2}})
    assert manifest_hash(tmp_path) != before
    assert json.loads((tmp_path / "manifest.json").read_text())["config"] == {"a": 2}


# --- StepFolder: the one way a step claims, resumes and finishes its --out ------------------------


def test_claim_new_folder_writes_a_claim_and_finish_replaces_it(tmp_path):
    from cxrdiff.artifacts import CLAIM, StepFolder

    out = tmp_path / "run"
    folder = StepFolder.claim(out, "sample", {"steps": 5})
    assert folder.state == "new" and (out / CLAIM).is_file()
    (out / "a.png").write_bytes(b"x")
    manifest = folder.finish({"steps": 5, "out": str(out)}, files=["a.png"])
    assert not (out / CLAIM).exists()
    on_disk = read_manifest(out, "sample")
    assert on_disk["settings"] == {"steps": 5} and on_disk["settings_key"] == folder.key == manifest["settings_key"]
    assert on_disk["files"] == {"a.png": 1}


def test_claim_same_settings_resumes_or_reports_finished(tmp_path):
    from cxrdiff.artifacts import StepFolder

    out = tmp_path / "run"
    StepFolder.claim(out, "ground", {"steps": 5, "word": ["a"]})
    (out / "part-0.npz").write_bytes(b"x")
    again = StepFolder.claim(out, "ground", {"word": ["a"], "steps": 5})  # key order does not matter
    assert again.state == "resume" and not again.finished
    again.finish({})
    done = StepFolder.claim(out, "ground", {"steps": 5, "word": ("a",)})  # a tuple is the list it was saved as
    assert done.finished and done.manifest["step"] == "ground"


@pytest.mark.parametrize("finished", [False, True])
def test_claim_other_settings_refused_naming_them(tmp_path, finished):
    from cxrdiff.artifacts import OtherSettings, StepFolder

    out = tmp_path / "run"
    folder = StepFolder.claim(out, "sample", {"steps": 5, "seed": 0})
    (out / "a.png").write_bytes(b"x")
    if finished:
        folder.finish({})
    wanted = r"(finished|unfinished) 'sample' run made with other settings \(steps 5 → 6\)"
    with pytest.raises(OtherSettings, match=wanted):
        StepFolder.claim(out, "sample", {"steps": 6, "seed": 0})


def test_claim_refuses_strangers_other_steps_and_files(tmp_path):
    from cxrdiff.artifacts import StepFolder

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"not empty and not a 'sample' folder \(has notes.txt\)"):
        StepFolder.claim(stranger, "sample", {})
    assert sorted(p.name for p in stranger.iterdir()) == ["notes.txt"]  # nothing written into it

    other = tmp_path / "other"
    StepFolder.claim(other, "prepare", {}).finish({})
    with pytest.raises(InputError, match="this is a 'prepare' folder, expected 'sample'"):
        StepFolder.claim(other, "sample", {})

    unfinished = tmp_path / "unfinished"
    StepFolder.claim(unfinished, "prepare", {})
    (unfinished / "train-00000.parquet").write_bytes(b"x")
    with pytest.raises(InputError, match="holds an unfinished 'prepare' run"):
        StepFolder.claim(unfinished, "sample", {})

    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(InputError, match="exists and is not a folder"):
        StepFolder.claim(file, "sample", {})


def test_claim_with_nothing_done_yet_may_be_retaken_with_other_settings(tmp_path):
    from cxrdiff.artifacts import StepFolder

    out = tmp_path / "run"
    StepFolder.claim(out, "sample", {"steps": 5})  # refused later (say, a bad flag): only the claim is there
    assert StepFolder.claim(out, "sample", {"steps": 6}).state == "new"
    assert StepFolder.claim(out, "finetune", {}).state == "new"


def test_input_identity_is_the_manifest_hash_of_a_step_folder_else_the_content(tmp_path):
    from cxrdiff.artifacts import input_identity

    folder = tmp_path / "prepared"
    write_manifest(folder, "prepare", files=[])
    (folder / "test.parquet").write_bytes(b"x")
    assert input_identity(folder) == manifest_hash(folder) == input_identity(folder / "test.parquet")
    image = tmp_path / "x.png"
    image.write_bytes(b"first")
    assert input_identity(image) == "sha256:" + hashlib.sha256(b"first").hexdigest()
    plain = tmp_path / "model"
    (plain / "unet").mkdir(parents=True)
    weights = plain / "unet" / "model.safetensors"
    weights.write_bytes(b"A" * 100)
    before = input_identity(plain)
    assert before.startswith("files:") and input_identity(tmp_path / "model") == before  # stable
    moved = tmp_path / "elsewhere"
    shutil.copytree(plain, moved)  # copy2 keeps times: the same content is the same input wherever it is
    assert input_identity(moved) == before
    image.write_bytes(b"other")  # replaced in place: same path, new key
    assert input_identity(image) != "sha256:" + hashlib.sha256(b"first").hexdigest()


def test_input_identity_changes_when_a_model_is_rebuilt_in_place(tmp_path):
    """Same path, same file sizes, same safetensors headers (another seed): a new identity all the same."""
    from cxrdiff.artifacts import input_identity

    model = tmp_path / "base"
    (model / "unet").mkdir(parents=True)
    weights = model / "unet" / "model.safetensors"
    weights.write_bytes(b"A" * 100)
    os.utime(weights, ns=(1_000_000_000_000, 1_000_000_000_000))
    before = input_identity(model)
    weights.write_bytes(b"B" * 100)
    rebuilt = input_identity(model)
    assert rebuilt != before
    (model / ".cache").mkdir()  # hidden files (a download tool's) are not the model
    (model / ".cache" / "x").write_text("y")
    assert input_identity(model) == rebuilt


def test_take_over_restarts_own_folder_with_other_settings_but_still_refuses_strangers(tmp_path):
    from cxrdiff.artifacts import CLAIM, StepFolder

    out = tmp_path / "report"
    StepFolder.claim(out, "report", {"n": 1}).finish({})
    (out / "report.html").write_text("old")
    taken = StepFolder.claim(out, "report", {"n": 2}, take_over=True)
    assert taken.state == "resume" and not (out / "manifest.json").exists()
    assert json.loads((out / CLAIM).read_text())["settings"] == {"n": 2}
    assert (out / "report.html").read_text() == "old"  # left for the step to replace
    assert StepFolder.claim(out, "report", {"n": 2}).state == "resume"
    with pytest.raises(InputError, match="this is a 'prepare' folder"):
        other = tmp_path / "prepared"
        StepFolder.claim(other, "prepare", {}).finish({})
        StepFolder.claim(other, "report", {}, take_over=True)


def test_a_folder_from_before_settings_keys_is_refused_saying_so(tmp_path):
    from cxrdiff.artifacts import OtherSettings, StepFolder

    write_manifest(tmp_path, "sample", config={"steps": 5})  # what cxrdiff 0.1 wrote: no settings, no key
    with pytest.raises(OtherSettings, match=r"other settings \(settings not recorded: made by cxrdiff 0.1\)"):
        StepFolder.claim(tmp_path, "sample", {"steps": 5})
