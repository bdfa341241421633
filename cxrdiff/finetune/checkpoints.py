"""A run's resumable states (`Checkpoints`: weights, optimizer, EMA, every rank's generators, the data position)
and a kept checkpoint exported as a model folder that `sample` and `ground` read (`export_checkpoint`)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import (
    StepFolder,
    atomic_dir,
    read_manifest,
)
from cxrdiff.config import to_dict
from cxrdiff.console import log
from cxrdiff.errors import InputError
from cxrdiff.finetune.config import CHECKPOINTS, STEP
from cxrdiff.finetune.lora import TrainingMode, add_adapters, export_adapters
from cxrdiff.finetune.training import TrainingRun, seeded_generators


class Checkpoints:
    """A run's resumable states, `out/checkpoints/step-NNNNNNN/`: accelerate's model, optimizer and LR
    scheduler state, the EMA, every rank's generators (`rng-R.pt`) and the data position (`state.json`).

    A checkpoint is complete or absent: all ranks write into one hidden folder that is renamed when
    every rank is done. Only the newest `keep` stay. Whether a checkpoint may be resumed under a
    config is the folder claim's decision (`run_settings`), not the checkpoint's.
    """

    def __init__(self, out: Path, keep: int = 1) -> None:
        self.out, self.folder, self.keep = Path(out), Path(out) / CHECKPOINTS, keep

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:07d}"

    def saved(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first (a half-written one is still under a hidden temporary name)."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := re.fullmatch(r"step-(\d{7})", p.name))]
        return sorted(f for f in found if (f[1] / "state.json").is_file())

    def latest(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint whose files read whole (`checkpoint_fault`)."""
        saved = self.saved()
        while saved and checkpoint_fault(saved[-1][1]) is not None:
            saved.pop()
        return saved[-1] if saved else None

    def check(self, steps: int, processes: int | None = None, world_change: int | None = None) -> int | None:
        """Refuse resuming a run already past `steps`, or one saved by another number of processes unless
        `world_change` (the global batch) is given and the checkpoint's data position is step × that batch; a
        newest checkpoint with a damaged file is named and the one before it taken (said), or, with none before
        it, refused, all before the run's manifest is touched. Returns the processes of a world change, else None."""
        saved = self.saved()
        while saved and (fault := checkpoint_fault(saved[-1][1])) is not None:
            damaged = saved.pop()[1]
            if not saved:
                raise InputError(f"{fault}; {self.out} keeps no earlier checkpoint: delete {damaged} to train from "
                                 "step 0 (or restore the file)")  # fmt: skip
            log.warning(f"{fault}; resuming from the previous checkpoint, {saved[-1][1].name}, instead "
                        f"(it replaces {damaged.name} when training reaches that step)")  # fmt: skip
        latest = saved[-1] if saved else None
        if latest is None:
            return None
        step, path = latest
        if step > steps:
            raise InputError(f"--out {self.out}: holds a run already at step {step}, past --steps {steps}")
        if processes is None:
            return None
        state = json.loads((path / "state.json").read_text())
        saved_by = state["processes"]
        if saved_by == processes:
            return None
        if world_change is None:
            raise InputError(f"--out {self.out}: checkpoints from {saved_by} processes, now {processes}; resume "
                             "with as many, or pass --allow-world-change (docs/slurm.md: what differs)")  # fmt: skip
        if state["samples_seen"] != step * world_change:
            raise InputError(f"{path / 'state.json'}: samples_seen {state['samples_seen']} is not step {step} × "
                             f"the global batch {world_change}; a world change keeps the global batch")  # fmt: skip
        return saved_by

    def save(self, run: TrainingRun, step: int, rng: dict[str, Any]) -> Path:
        """Every rank writes its part (`rng` is its generators' state) into one folder; prune old ones."""
        import torch
        from accelerate.utils import broadcast_object_list

        accelerator, final = run.accelerator, self.path(step)
        with contextlib.ExitStack() as stack:
            holder = [stack.enter_context(atomic_dir(final)) if run.main else None]
            broadcast_object_list(holder)
            tmp = Path(holder[0])
            accelerator.wait_for_everyone()
            accelerator.save_state(tmp, safe_serialization=True)
            torch.save({**rng, **save_ema(run, tmp)}, tmp / f"rng-{run.rank}.pt")
            accelerator.wait_for_everyone()
            if run.main:
                samples = step * run.config.batch_size
                state = {"step": step, "samples_seen": samples, "processes": run.world, "config": to_dict(run.config)}
                (tmp / "state.json").write_text(json.dumps(state, indent=2))
        accelerator.wait_for_everyone()
        if run.main:
            for _, old in self.saved()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, run: TrainingRun, path: Path) -> None:
        """Restore weights, optimizer, LR scheduler, EMA and this rank's generators from `path`."""
        import torch

        run.accelerator.load_state(path)
        mine = path / f"rng-{run.rank}.pt"
        own = torch.load(mine if mine.is_file() else path / "rng-0.pt", weights_only=True)  # the EMA's state: alike
        if run.ema is not None:
            from safetensors.torch import load_file

            shadow = load_file(path / "ema.safetensors")
            run.ema.load_state_dict({**own["ema"], "shadow_params": [shadow[n] for n in run.unet_names()]})
            run.ema.to(run.device)
        if mine.is_file():
            set_rng_state(own, run.gen, run.np_gen)
        else:  # saved by fewer processes (--allow-world-change): no draws of its own to continue
            step = json.loads((path / "state.json").read_text())["step"]
            run.gen, run.np_gen = seeded_generators(run.config.seed, run.rank, run.device, step=step)


def checkpoint_fault(path: Path) -> str | None:
    """What makes a checkpoint unreadable, as `FILE: what` (None when every file reads whole): a safetensors
    file whose header or data is cut short (safetensors' own check, no tensor read), a torch file
    (`optimizer.bin`, `rng-R.pt`, ...: zip archives) without its directory, an unreadable `state.json`.
    A file cut by a full disk or a copy that stopped is found here, before anything is loaded or removed."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(file, "pt"):
                    pass
            elif file.suffix in (".bin", ".pt", ".pkl"):
                with zipfile.ZipFile(file):
                    pass
            elif file.name == "state.json":
                json.loads(file.read_text())
        except (SafetensorError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"{file}: damaged, truncated or unreadable ({why})"
    return None


def save_ema(run: TrainingRun, folder: Path) -> dict[str, Any]:
    """The EMA's shadow weights as safetensors (main process); its small state goes in every rank's file."""
    if run.ema is None:
        return {}
    ema_state = run.ema.state_dict()
    if run.main:
        from safetensors.torch import save_file

        params = zip(run.unet_names(), ema_state["shadow_params"], strict=True)
        save_file({n: t.detach().cpu().contiguous() for n, t in params}, folder / "ema.safetensors")
    return {"ema": {k: v for k, v in ema_state.items() if k != "shadow_params"}}


def rng_state(gen: Any, np_gen: np.random.Generator) -> dict[str, Any]:
    import torch

    state = {
        "generator": gen.get_state(),
        "numpy_generator": json.dumps(np_gen.bit_generator.state),
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([np.random.get_state()[0], np.random.get_state()[1].tolist(), *np.random.get_state()[2:]]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], gen: Any, np_gen: np.random.Generator) -> None:
    import torch

    gen.set_state(state["generator"])
    np_gen.bit_generator.state = json.loads(state["numpy_generator"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = json.loads(state["numpy"])
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_STEP = "checkpoint"  # the step name of an exported checkpoint's folder (sample and ground take it)


def checkpoint_identity(path: Path) -> dict[str, Any]:
    """What identifies a checkpoint without reading its weights: its state.json (step, run config) by sha256
    and its weight files by name, size and mtime (a retrained run rewrites them)."""
    import hashlib

    state = hashlib.sha256((path / "state.json").read_bytes()).hexdigest()
    weights = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.glob("*.safetensors"))}
    return {"state_sha256": state, "weights": weights}


def export_checkpoint(run: str | os.PathLike, step: int, out: str | os.PathLike) -> dict[str, Any]:
    """Write the kept checkpoint `step` of a finished run as a model folder (a `checkpoint` step folder):
    the run's VAE, tokenizer and scheduler with the checkpoint's UNet and text encoder, the UNet's EMA when
    the run exported EMA weights; so `sample` and `ground` read it as they read the run. The weights are
    exactly those the run's own export would have written at that step (a LoRA run's: its adapters file, and
    the adapters merged). Returns at once when `out` holds this checkpoint's export already."""
    from safetensors.torch import load_file

    from cxrdiff.models import load_components, save_components

    run, out = Path(run), Path(out)
    manifest = read_manifest(run, STEP)
    kept = dict(Checkpoints(run).saved())
    if step not in kept:
        have = ", ".join(str(s) for s in kept) or "none"
        raise InputError(f"{run}: no kept checkpoint at step {step} (kept: {have})")
    path, weights = kept[step], manifest.get("weights", "raw")
    if (fault := checkpoint_fault(path)) is not None:
        others = ", ".join(str(s) for s in kept if s != step and checkpoint_fault(kept[s]) is None) or "none"
        raise InputError(f"{fault}; export another kept checkpoint (intact: {others})")
    wanted = {"run": os.fspath(run.resolve()), "step": step, "weights": weights}
    wanted["checkpoint"] = checkpoint_identity(path)
    folder = StepFolder.claim(out, CHECKPOINT_STEP, wanted)
    if folder.finished:
        return {"out": str(out), "step": step}
    comps = load_components(run)
    mode = TrainingMode.of_manifest(manifest)
    add_adapters(mode, comps.unet, comps.text_encoder)  # LoRA: the layers the run trained, so that its state loads
    state = load_file(path / "model.safetensors")
    comps.text_encoder.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")})
    if comps.text_projection is not None:  # a text encoder of another width than the UNet's: its learned map
        comps.text_projection.load_state_dict({k[16:]: v for k, v in state.items() if k.startswith("text_projection.")})
    comps.unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
    if weights == "ema":  # what the EMA follows: every UNet weight, or a LoRA run's UNet adapters
        unexpected = comps.unet.load_state_dict(load_file(path / "ema.safetensors"), strict=False).unexpected_keys
        if unexpected:
            raise InputError(f"{path / 'ema.safetensors'}: weights the run's UNet does not have ({unexpected[0]}, ...)")
    comps.unet, comps.text_encoder = export_adapters(out, mode, comps.unet, comps.text_encoder)
    save_components(comps, out)
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    folder.finish(
        config={"run": os.fspath(run), "step": step},
        inputs={"run": run},
        seed=manifest.get("seed"),
        files=files,
        extra={
            "steps": step,
            "text_encoder": manifest.get("text_encoder"),
            "weights": weights,
            "training_mode": mode.record(manifest.get("training_mode", {}).get("text_targets", ())),
        },
    )
    return {"out": str(out), "step": step}
