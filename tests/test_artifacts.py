"""Manifests and atomic writes."""

import json

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
