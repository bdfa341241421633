"""`cxrdiff report` on COCO data: the paper's Table 2 (MS-COCO in-domain fine-tuning).

When the prepared folder is a `prepare --format coco` one, the report measures, for each run and (with
`--checkpoints`) each of its kept checkpoints, the fidelity of images sampled from the test captions and
the object-segmentation AUC-ROC of the category word's cross-attention map against the category's mask
(`ground` on `coco_test.parquet`). A base model folder among the runs is the pretrained model: step 0.
Each model's samples and grounding are step folders under `runs/<name>/[step-NNNNNNN/]` with their own
keys, so a later report reuses them. The published Table 2 stands beside the measured rows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import MANIFEST, StepFolder, input_identity, read_manifest, settings_key, write_json, write_text
from cxrdiff.config import settings, to_dict
from cxrdiff.errors import InputError
from cxrdiff.metrics.score import Score
from cxrdiff.report.checkpoints import selected
from cxrdiff.report.config import STEP, ReportConfig, Steps
from cxrdiff.report.document import Page, Table, html, markdown
from cxrdiff.report.page import interval_text
from cxrdiff.report.published import PUBLISHED_TABLE2
from cxrdiff.report.records import Grounding, Measure
from cxrdiff.report.steps import cached, default_steps, recorded_real, run_kind, run_names, run_step
from cxrdiff.report.verdicts import grounding_intervals

THUMBNAIL = 8  # the fidelity proxy without Inception weights: FD on 8×8 grey thumbnails (64 features)


def _models(config: ReportConfig, name: str, run: Path) -> list[tuple[int, str, Path]]:
    """(step, text encoder, model folder) to measure: a base model is step 0; a fine-tune its final model
    and, with --checkpoints, its other kept checkpoints (exported under the report folder)."""
    if not (run / MANIFEST).is_file():
        return [(0, "pretrained", run)]
    manifest = read_manifest(run, ("finetune", "checkpoint"))
    kind, final = manifest.get("text_encoder", "?"), int(manifest.get("steps") or 0)
    models = [(final, kind, run)]
    if config.checkpoints and manifest.get("step") == "finetune":
        from cxrdiff.finetune import export_checkpoint

        for step, _ in selected(run, config.checkpoint_every):
            if step != final:
                out = Path(config.out) / "runs" / name / f"step-{step:07d}" / "model"
                if not (out / MANIFEST).is_file():
                    export_checkpoint(run, step, out)
                models.append((step, kind, out))
    return sorted(models, key=lambda m: m[0])


def _grey_real(real: Path, n: int, size: int) -> np.ndarray:
    """The first `n` test images in the prepared frame, as grey (the mean of RGB, as `sample` writes its PNGs)."""
    import pandas as pd

    from cxrdiff.images import load_rgb, resize_center_crop

    test = pd.read_parquet(real / "test.parquet", columns=["image_path"]).head(n)
    frames = [resize_center_crop(load_rgb(p), size).astype(np.float32).mean(axis=2) for p in test["image_path"]]
    return np.round(np.stack(frames)).astype(np.uint8)  # (n, size, size)


def _fidelity(config: ReportConfig, samples: Path, real: Path) -> dict[str, Any]:
    """FID (InceptionV3 weights given or cached), else a Fréchet distance on 8×8 thumbnails, named as such."""
    import pandas as pd
    import torch

    from cxrdiff.images import load_grayscale
    from cxrdiff.metrics import fid

    files = pd.read_parquet(samples / "samples.parquet")["file"]
    fake = np.stack([load_grayscale(samples / f) for f in files])  # (n, size, size)
    reference = _grey_real(real, config.n_fid, fake.shape[-1])
    if config.inception_weights is not None or fid.default_inception_path().is_file():
        cache = Path(config.out) / ".fidelity_cache"
        score = fid.fid(reference, fake, weights=config.inception_weights, size=fake.shape[-1], cache_root=cache,
                        resamples=config.fd_resamples, seed=config.seed)  # fmt: skip
        return score.as_dict()

    def thumbnails(x: Any) -> Any:
        return torch.nn.functional.adaptive_avg_pool2d(x, THUMBNAIL).flatten(1)  # (batch, 64)

    name = f"FD ({THUMBNAIL}×{THUMBNAIL} grey thumbnails)"
    return fid.fd_features(
        reference, fake, thumbnails, name, label="no Inception weights: a pixel-level proxy",
        resamples=config.fd_resamples, seed=config.seed,
    ).as_dict()  # fmt: skip


def _measure(config: ReportConfig, real: Path, folder: Path, model: Path, steps: Mapping[str, Any]) -> dict[str, Any]:
    """One model: samples from the test captions, grounding on coco_test.parquet, fidelity (cached by key)."""
    sample_fn, sample_config = steps["sample"]
    ground_fn, ground_config = steps["ground"]
    done: list[str] = []
    samples = run_step("samples", sample_fn, sample_config(
        out=folder / "samples", model=model, prompts=real / "test.parquet", prompt_column="caption", n_per_prompt=1,
        limit=config.n_fid, steps=config.sample_steps, guidance=config.guidance, scheduler=config.scheduler,
        seed=config.seed, batch_size=config.batch_size), done)  # fmt: skip
    ground = run_step("ground", ground_fn, ground_config(
        out=folder / "ground", model=model, data=real / "coco_test.parquet", steps=config.ground_steps,
        window=config.ground_window, seed=config.seed, limit=config.ground_limit, batch_size=config.batch_size),
        done)  # fmt: skip
    key = settings_key({"samples": input_identity(samples), "real": input_identity(real), "n_fid": config.n_fid,
                        "inception_weights": str(config.inception_weights)})  # fmt: skip
    fidelity, _ = cached(folder / "metrics.json", key, lambda: {"fidelity": _fidelity(config, samples, real)})
    summary = json.loads((ground / "summary.json").read_text())
    intervals = grounding_intervals(ground, config.seed, config.resamples)
    return {"fidelity": fidelity["fidelity"], "grounding": summary.get("average"), "classes": summary.get("classes"),
            "grounding_intervals": intervals, "recomputed": done}  # fmt: skip


def report_coco(config: ReportConfig, classifier: Any = None, steps: Steps | None = None) -> dict[str, Any]:
    """Table 2 for COCO data: every run (and checkpoint) measured, then metrics.json, report.md, report.html.
    No classifier check on COCO (`classifier` is not used)."""
    real = recorded_real(config)
    if not config.runs:
        raise InputError("report: give at least one RUN folder (a finetune output or a base model folder)")
    if config.out is None:
        raise InputError("--out: required (the report folder)")
    for name in ("test.parquet", "coco_test.parquet"):
        if real is None or not (real / name).is_file():
            raise InputError(f"--real {real}: no {name} (expected a `prepare --format coco` output folder)")
    for run in config.runs:
        run_kind(Path(run))
    wanted = settings(config, runs=[input_identity(r) for r in config.runs], real=input_identity(real),
                      inception_weights=input_identity(config.inception_weights) if config.inception_weights else None,
                      format="coco")  # fmt: skip
    folder = StepFolder.claim(Path(config.out), STEP, wanted, take_over=True)
    steps = dict(steps or default_steps())
    rows, recomputed = [], {}
    for name, run in zip(run_names(config), config.runs, strict=True):
        done = []
        for step, kind, model in _models(config, name, Path(run)):
            sub = Path(config.out) / "runs" / name / (f"step-{step:07d}" if model != Path(run) else "")
            measured = _measure(config, real, sub, model, steps)
            done += [f"{m} {step}" for m in measured.pop("recomputed")]
            rows.append({"run": name, "text_encoder": kind, "step": step, **measured})
        recomputed[name] = ",".join(done) or "nothing"
    metrics = {"table2": rows, "published": PUBLISHED_TABLE2, "real_folder": str(Path(real).resolve()),
               "settings": to_dict(config)}  # fmt: skip
    out = Path(config.out)
    write_json(out / "metrics.json", metrics)
    page = table2_page(rows)
    write_text(out / "report.md", markdown(page))
    write_text(out / "report.html", html(page))
    folder.finish(config=to_dict(config), inputs={"real": real}, seed=config.seed,
                  files=["metrics.json", "report.md", "report.html"])  # fmt: skip
    return {"out": str(out), "report": str(out / "report.html"), "recomputed": recomputed}


def _grounding(row: Mapping[str, Any]) -> Grounding:
    """A Table 2 row's grounding: its average, per category and the average's intervals."""
    return Grounding.read({"average": row["grounding"], "classes": row.get("classes")}, row.get("grounding_intervals"))


def _mean(measure: Measure | None) -> float | None:
    return measure.mean if measure else None


def _percent(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


PROTOCOL_COCO = (
    "Fidelity is FID when InceptionV3 weights are available, else a Fréchet distance on small grey thumbnails "
    "(named so; not comparable with any FID). Images are compared in grey, the mean of RGB, as `cxrdiff sample` "
    "writes them. AUC-ROC: the map of the caption's word that names the category against the union of its "
    "instance masks (crowds included). [ ] a 95% interval: a bootstrap over the test pairs (grounding) or the "
    "generated images (fidelity, ± 1.96 bootstrap s.d.)."
)


def table2_page(rows: list[dict[str, Any]]) -> Page:
    """Table 2 (measured, then the paper's) and the per-category AUC-ROC, as one page."""
    measured = []
    read = [(r, _grounding(r), Score.from_dict(r["fidelity"]) if r["fidelity"] else None) for r in rows]
    for r, g, f in read:
        average = g.average_or_empty
        mean = {m: _mean(average.measure(m)) for m in ("auc_roc", "top1", "cnr")}
        cnr = "–" if mean["cnr"] is None else f"{mean['cnr']:.2f}" + interval_text(g.interval("Average", "cnr"))
        value = "–" if f is None else f"{f.value:.2f}" + interval_text(f.interval)
        auc = _percent(mean["auc_roc"]) + interval_text(g.interval("Average", "auc_roc"), 1, 100)
        measured.append([str(r["run"]), str(r["text_encoder"]), str(r["step"]), f.name if f else "–", value,
                         auc, _percent(mean["top1"]), cnr, str(average.n or 0)])  # fmt: skip
    headers = ["run", "text encoder", "step", "fidelity", "value", "AUC-ROC %", "Top-1 %", "CNR", "pairs"]
    tables = [
        Table("Measured", headers, measured),
        Table(
            "Published (the paper's Table 2: SD2 on MS-COCO, batch 16, FID on the test images)",
            ["model", "steps", "FID", "AUC-ROC %"],
            [[str(p["model"]), str(p["steps"]), str(p["fid"]), str(p["auc_roc"])] for p in PUBLISHED_TABLE2],
        ),
    ]
    sections = [("Table 2: fidelity and object segmentation AUC-ROC (%), per checkpoint", [], tables)]
    categories = sorted({c for _, g, _ in read for c in g.classes})
    if categories:
        cells = [
            [str(r["run"]), str(r["step"])]
            + [_percent(_mean(loc.auc_roc) if (loc := g.at(c)) else None) for c in categories]
            for r, g, _ in read
        ]
        sections.append(("AUC-ROC % per category", [], [Table("By category", ["run", "step", *categories], cells)]))
    return Page(title="cxrdiff report: MS-COCO-style in-domain fine-tuning", sections=sections,
                protocol=[PROTOCOL_COCO])  # fmt: skip
