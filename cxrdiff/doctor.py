"""`cxrdiff doctor`: check offline, before a long job, that what each step needs is in place.

Required (exit 1 when any is missing, so a job script can stop early): the base model folder when one
is named, and the InceptionV3 and torchxrayvision weight files that `report` needs for FID / FID_XRV
and the classifier check. Reported for information only: CUDA, bf16 support and an accelerate config
(every step also runs on one CPU without them). Nothing is downloaded or loaded beyond file checks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cxrdiff.errors import InputError

OK, MISSING, INFO = "ok", "MISSING", "note"


def _weights(given: Path | None, kind: str) -> tuple[str, str]:
    from cxrdiff.metrics.fid import resolve_weights

    try:
        return OK, str(resolve_weights(given, kind))
    except InputError as exc:
        return MISSING, str(exc)


def _base_model(path: Path | None) -> tuple[str, str]:
    from cxrdiff.models import PARTS, check_model_folder

    if path is None:
        return INFO, "not checked (pass --base-model PATH: a local diffusers Stable Diffusion folder)"
    try:
        check_model_folder(path)
    except InputError as exc:
        return MISSING, f"{exc} (prepare/finetune need model_index.json and {', '.join(PARTS)}/)"
    return OK, f"{path} ({', '.join(PARTS)})"


def _device() -> dict[str, tuple[str, str]]:
    import torch

    if not torch.cuda.is_available():
        return {
            "cuda": (INFO, f"no CUDA device (torch {torch.__version__}); steps run on the CPU, slowly"),
            "bf16": (INFO, "not available without CUDA; use --mixed-precision no"),
        }
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    bf16 = torch.cuda.is_bf16_supported()
    return {
        "cuda": (OK, f"{torch.cuda.device_count()} device(s): {names}"),
        "bf16": (OK, "supported") if bf16 else (INFO, "not supported on this GPU; use --mixed-precision fp16"),
    }


def _accelerate() -> tuple[str, str]:
    from accelerate.commands.config import default_config_file

    path = Path(os.environ.get("ACCELERATE_CONFIG_FILE", default_config_file))
    if path.is_file():
        return OK, str(path)
    return INFO, f"no {path}; `accelerate launch` uses one process per GPU (run `accelerate config` to set one)"


def doctor(
    base_model: Path | None = None,
    inception_weights: Path | None = None,
    xrv_weights: Path | None = None,
    distributed: bool = False,
    out: Path | None = None,
    dist_timeout: float | None = None,
) -> dict[str, Any] | None:
    """One line per check ("ok: ...", "MISSING: ... where it goes", "note: ..."), `ok` and `missing`.

    `ok` is False when a required item (base model when given, Inception and torchxrayvision weights)
    is missing; the CLI then exits 1. `distributed`: under `accelerate launch`, also the process group, a
    barrier and `out`'s locks across the processes (`cxrdiff.distributed.check_group`; a failed one is
    MISSING); only the main process returns the checks (the others None).
    """
    group: dict[str, tuple[str, str]] = {}
    if distributed:
        from cxrdiff.distributed import check_group

        found = check_group(out, dist_timeout)
        if found is None:
            return None
        group = {f"distributed_{name}": (OK if good else MISSING, detail) for name, (good, detail) in found.items()}
    checks: dict[str, tuple[str, str]] = {
        **group,
        "base_model": _base_model(base_model),
        "inception_weights": _weights(inception_weights, "inception"),
        "xrv_weights": _weights(xrv_weights, "xrv"),
        **_device(),
        "accelerate_config": _accelerate(),
    }
    missing = [name for name, (status, _) in checks.items() if status == MISSING]
    out: dict[str, Any] = {name: f"{status}: {detail}" for name, (status, detail) in checks.items()}
    out["missing"] = len(missing)
    out["ok"] = not missing
    return out
