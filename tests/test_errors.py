"""Faults users meet, through the real entry point (`cxrdiff.cli.main`): each is one line on stderr, naming the file
or option, with exit code 2 — never a raw exception or a box of usage text."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_main import run_main
from fixtures_prepared import build_prepared


def _model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    return copy


def test_a_damaged_training_shard_is_named(tmp_path, tiny_model, capsys, monkeypatch):
    """Latent pages overwritten, the footer intact: pyarrow fails only when the latents are read, in training."""
    import pyarrow.parquet as pq

    data = build_prepared(tmp_path / "prepared", n=8, shard_size=4, model=tiny_model)
    shard = data / "train-00001.parquet"
    group = pq.ParquetFile(shard).metadata.row_group(0)
    column = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == "latent_mean")
    damaged = bytearray(shard.read_bytes())
    start = column.data_page_offset + 4
    damaged[start : start + column.total_compressed_size - 8] = b"\xab" * (column.total_compressed_size - 8)
    shard.write_bytes(bytes(damaged))
    argv = ["-q", "finetune", "--data", data, "--base-model", tiny_model, "--out", tmp_path / "run", "--frozen-text"]
    code, err, _ = run_main([*argv, "--steps", "2", "--batch-size", "4"], capsys, monkeypatch)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {shard}: not a readable prepared shard (")
    assert err[0].endswith("re-run `cxrdiff prepare` into a new folder")


def test_an_out_on_a_read_only_disk_is_one_line(tmp_path, capsys, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    out = tmp_path / "tree"
    code, err, _ = run_main(["phantom", out, "--patients", "2", "--size", "32"], capsys, monkeypatch)
    assert (code, err) == (2, [f"error: {out}: Read-only file system"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_an_out_in_a_folder_without_write_permission_is_one_line(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, err, _ = run_main(["phantom", locked / "tree", "--patients", "2", "--size", "32"], capsys, monkeypatch)
    assert (code, err) == (2, [f"error: {locked / 'tree'}: Permission denied"])


def test_an_out_under_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "tree"
    code, err, _ = run_main(["phantom", out, "--patients", "2", "--size", "32"], capsys, monkeypatch)
    assert (code, err) == (2, [f"error: {out}: Not a directory"])
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_config_that_names_a_folder_or_not_a_text_file_is_one_line(tmp_path, capsys, monkeypatch):
    code, err, _ = run_main(["phantom", tmp_path / "tree", "--config", tmp_path], capsys, monkeypatch)
    assert (code, err) == (2, [f"error: {tmp_path}: is a folder; --config takes a TOML file"])
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\xff\xfe\x00 weights")
    code, err, _ = run_main(["phantom", tmp_path / "tree", "--config", binary], capsys, monkeypatch)
    assert (code, err) == (2, [f"error: {binary}: not a UTF-8 text file; --config takes a TOML file"])


def test_a_mistyped_vae_config_is_refused_by_the_steps_and_by_doctor(tmp_path, tiny_model, capsys, monkeypatch):
    model = _model_copy(tiny_model, tmp_path)
    config = model / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "latent_channels": "4"}))
    code, err, _ = run_main(["model", "info", model], capsys, monkeypatch)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {config}: cannot build the vae from it (TypeError: ")
    code, _, out = run_main(["--json", "doctor", "--base-model", model], capsys, monkeypatch)
    report = json.loads(out)  # doctor exits 1 when something is missing; the model is, with the same reason
    assert (
        code == 1
        and report["ok"] is False
        and report["base_model"]
        == f"MISSING: {err[0][7:]} "
        + ("(prepare/finetune need model_index.json and unet, vae, text_encoder, tokenizer, scheduler/)")
    )


def test_doctor_says_why_a_mistyped_model_is_not_ok(tmp_path, tiny_model):
    from cxrdiff.doctor import doctor

    model = _model_copy(tiny_model, tmp_path)
    config = model / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "block_out_channels": 32}))
    result = doctor(base_model=model)
    assert result["ok"] is False
    assert result["base_model"].startswith(f"MISSING: {config}: cannot build the unet from it (TypeError: ")
    assert doctor(base_model=tiny_model)["base_model"].startswith("ok: ")


class _Code:
    """Pickles as a call of `print`: what torch's weights-only loader refuses to run."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_a_pickled_text_encoder_is_named_in_one_line(tmp_path, tiny_model, capsys, monkeypatch):
    import torch
    from safetensors.torch import load_file

    model = _model_copy(tiny_model, tmp_path)
    folder = model / "text_encoder"
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**weights, "extra": _Code()}, folder / "pytorch_model.bin")
    code, err, out = run_main(["model", "info", model], capsys, monkeypatch)
    assert (code, err) == (2, [
        f"error: {folder}: pytorch_model.bin: a pickle that is not loaded (it holds more than tensors, and loading "
        "it could run code); save the weights as safetensors"
    ])  # fmt: skip
    assert "this ran while loading" not in out


@pytest.mark.parametrize(
    "argv, line",
    [
        (["sample", "--no-such-option"], "error: No such option: --no-such-option (see cxrdiff sample --help)"),
        (["smaple"], "error: No such command 'smaple'. Did you mean 'sample'? (see cxrdiff --help)"),
        (["model", "tiny"], "error: Missing argument 'out'. (see cxrdiff model tiny --help)"),
    ],
)
def test_usage_errors_are_one_line_naming_the_help(argv, line, capsys, monkeypatch):
    code, err, _ = run_main(argv, capsys, monkeypatch)
    assert (code, err) == (2, [line])


def test_a_bad_option_value_is_one_line_from_the_shell_too():
    done = subprocess.run(
        [sys.executable, "-m", "cxrdiff", "sample", "--steps", "many"], capture_output=True, text=True
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert (
        done.stderr.startswith("error: Invalid value for '--steps': ") and "(see cxrdiff sample --help)" in done.stderr
    )
