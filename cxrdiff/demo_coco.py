"""`cxrdiff demo --coco`: the paper's in-domain chain (Table 2) on a COCO-layout phantom and a tiny model.

phantom --kind coco → a tiny base model whose VAE is fitted to the phantom's colour pictures → prepare
--format coco (with the phantom's synonym list) → a frozen and a learnable fine-tune, each keeping a mid-way
checkpoint → report (Table 2: the base model as step 0, each checkpoint and final model). Every step's
folder is reused when the demo runs again. The MIMIC demo (`cxrdiff.demo`) is separate and unchanged.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.console import log


@dataclasses.dataclass(frozen=True)
class CocoDemoPlan:
    images: int = 240  # train2017 images (val2017 gets a quarter: the test pairs)
    image_size: int = 96
    resolution: int = 64
    vae_steps: int = 300
    steps: int = 400  # fine-tuning steps per model
    batch_size: int = 16
    lr: float = 1e-3  # the tiny UNet starts from random weights (the paper: 5e-5 from SD2)
    sample_steps: int = 20
    ground_steps: int = 20
    ground_window: int = 16
    seed: int = 0


QUICK = CocoDemoPlan(images=80, vae_steps=100, steps=100, sample_steps=10, ground_steps=10, ground_window=8)


def _base_model(out: Path, phantom: Path, plan: CocoDemoPlan) -> Path:
    """A tiny SD2-shaped model (token-local text encoder) whose VAE is fitted to the phantom's train images."""
    from cxrdiff.images import load_rgb, resize_center_crop
    from cxrdiff.model.tiny import TinySpec, tiny_components
    from cxrdiff.models import save_components
    from cxrdiff.vae_fit import fit_vae, scale_to_unit_variance

    base = out / "base-model"
    if (base / "model_index.json").is_file():
        return base
    comps = tiny_components(TinySpec(resolution=plan.resolution, token_local_text=True), seed=plan.seed)
    files = sorted((phantom / "train2017").glob("*.jpg"))[:512]
    images = np.stack([resize_center_crop(load_rgb(f), plan.resolution) for f in files])  # (n, res, res, 3)
    fit_vae(comps.vae, images, plan.vae_steps, seed=plan.seed)
    comps.vae.register_to_config(scaling_factor=scale_to_unit_variance(comps.vae, images))
    save_components(comps, base)
    return base


def demo_coco(out: Path = Path("cxrdiff-demo-coco"), quick: bool = False) -> dict[str, Any]:
    """Run the in-domain chain and write the report; return its path, the Table 2 rows and seconds per stage."""
    from cxrdiff.finetune import FinetuneConfig, finetune
    from cxrdiff.phantom import PhantomConfig, make_phantom
    from cxrdiff.phantom.coco import WORDS_FILE
    from cxrdiff.prepare import PrepareConfig, prepare
    from cxrdiff.report import ReportConfig, report

    plan = QUICK if quick else CocoDemoPlan()
    out = Path(out)
    start, seconds = time.perf_counter(), {}

    def done(stage: str) -> None:
        seconds[stage] = round(time.perf_counter() - start - sum(seconds.values()), 1)

    phantom = out / "phantom-coco"
    make_phantom(PhantomConfig(phantom, patients=plan.images, seed=plan.seed, size=plan.image_size, kind="coco"))
    done("phantom")
    base = _base_model(out, phantom, plan)
    done("base model")
    prepared = out / "prepared"
    prepare(PrepareConfig(format="coco", coco=phantom, coco_words=phantom / WORDS_FILE, base_model=base,
                          out=prepared, seed=plan.seed))  # fmt: skip
    done("prepare")
    runs = []
    for frozen in (True, False):
        run = out / ("frozen" if frozen else "learnable")
        finetune(FinetuneConfig(data=prepared, base_model=base, out=run, frozen_text=frozen, steps=plan.steps,
                                batch_size=plan.batch_size, lr=plan.lr, checkpoint_every=plan.steps // 2,
                                keep_checkpoints=2, seed=plan.seed))  # fmt: skip
        runs.append(run)
        done(f"finetune {run.name}")
    config = ReportConfig(runs=(base, *runs), names=("pretrained", "frozen", "learnable"), out=out / "report",
                          real=prepared, checkpoints=True, n_fid=10_000, sample_steps=plan.sample_steps,
                          ground_steps=plan.ground_steps, ground_window=plan.ground_window, seed=plan.seed)  # fmt: skip
    result = report(config)
    done("report")
    import json

    rows = json.loads((out / "report" / "metrics.json").read_text())["table2"]
    table = [{"run": r["run"], "step": r["step"], "auc_roc": (r["grounding"] or {}).get("auc_roc", {}).get("mean"),
              "fidelity": (r["fidelity"] or {}).get("value")} for r in rows]  # fmt: skip
    log.info("demo --coco: %.0f s (%s)", sum(seconds.values()), ", ".join(f"{k} {v} s" for k, v in seconds.items()))
    return {"report": result["report"], "table2": table, "seconds": seconds}
