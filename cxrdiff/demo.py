"""`cxrdiff demo`: the whole chain on phantom data and a tiny model, on a laptop CPU.

phantom → tiny base model (its VAE fitted briefly to the phantom images, so samples decode to
X-ray-like pictures) → prepare → finetune frozen and learnable → sample → ground → report. No Inception
or X-ray classifier weights can ship, so the report's fidelity features and classifier check come from a
small pathology classifier trained here on the phantom training images, and are named as such.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import MANIFEST, read_manifest
from cxrdiff.console import log
from cxrdiff.errors import InputError
from cxrdiff.vae_fit import fit_vae, scale_to_unit_variance


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """Sizes of a demo run; `quick` is the CI-sized one."""

    patients: int = 240
    image_size: int = 128
    resolution: int = 64
    pretrain_patients: int = 1000  # the second phantom draw the text encoder is pretrained on
    pretrain_steps: int = 600  # contrastive pretraining of the text encoder
    pretrain_batch_size: int = 64
    vae_steps: int = 120
    vae_batch_size: int = 8
    finetune_steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3  # a random-init tiny UNet needs far more than the paper's 5e-5 for pretrained SD2
    sample_steps: int = 20
    ground_steps: int = 20
    ground_window: int = 16
    n_fid: int = 200
    diversity_prompts: int = 16
    test_size: int = 200
    # the classifier check's own prompt set (report --classifier-prompts-per-class): 10 generated images per class
    # and 10 No Finding, where the ~72 p19 test images hold 1 to 5 per class whose only label is the class
    classifier_prompts_per_class: int = 10
    seed: int = 0
    # `demo --lora`: the rank of the LoRA runs beside the full fine-tunes, fixed before any LoRA outcome was seen
    # (docs/method.md, "LoRA"): the middle of Generate to Ground's 4-256 and the example; alpha = rank
    lora_rank: int = 16

    @classmethod
    def quick(cls) -> DemoPlan:
        """A first look in about two minutes (three with --trainings 2): every stage, few steps."""
        data = {"patients": 80, "pretrain_patients": 200, "test_size": 24}
        steps = {"pretrain_steps": 80, "vae_steps": 40, "finetune_steps": 60, "sample_steps": 6, "ground_steps": 6}
        measures = {"ground_window": 4, "n_fid": 24, "diversity_prompts": 4, "classifier_prompts_per_class": 5}
        return cls(**data, **steps, **measures)


TEXT_INITS = ("pretrained", "token-local")  # `demo --text-init`; "both" runs the two side by side
TEXT_ENCODERS = ("clip", "bert")  # `demo --text-encoders`: the tiny CLIP (the default) and a tiny BERT beside it
BERT_NAMES = {"frozen": "Finetune_F (BERT)", "learnable": "Finetune_L (BERT)"}
PRETRAIN_SEED_OFFSET = 1000  # the pretraining phantom is another draw: seed + 1000, so no image is shared


def _train_images(prepared: Path, resolution: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prepared training images (uint8, model frame) and their labels for the demo's classifier."""
    import pyarrow.parquet as pq

    from cxrdiff.images import load_grayscale, resize_center_crop
    from cxrdiff.metrics.classifier import PHANTOM_CLASSES

    columns = ["image_path", *PHANTOM_CLASSES]
    frames = [pq.read_table(p, columns=columns).to_pandas() for p in sorted(prepared.glob("train-*.parquet"))]
    import pandas as pd

    table = pd.concat(frames, ignore_index=True).head(limit)
    images = np.stack([resize_center_crop(load_grayscale(p), resolution) for p in table["image_path"]])
    return images, np.array(table[list(PHANTOM_CLASSES)], dtype=np.float32)  # blank: NaN, uncertain: -1


def _phantom_images(phantom: Path, resolution: int, limit: int) -> np.ndarray:
    """Frontal phantom images outside p19, in the model frame, to fit the VAE on."""
    import pandas as pd

    from cxrdiff.data import TEST_PATIENT_FOLDER, VIEWS_KEPT, patient_folder
    from cxrdiff.images import load_grayscale, resize_center_crop

    meta = pd.read_csv(phantom / "mimic-cxr-2.0.0-metadata.csv.gz")
    meta = meta[meta["ViewPosition"].isin(VIEWS_KEPT)]
    paths = [
        phantom
        / "files"
        / patient_folder(row.subject_id)
        / f"p{row.subject_id}"
        / f"s{row.study_id}"
        / f"{row.dicom_id}.jpg"
        for row in meta.itertuples()
        if patient_folder(row.subject_id) != TEST_PATIENT_FOLDER
    ]
    return np.stack([resize_center_crop(load_grayscale(p), resolution) for p in paths[:limit]])


def _fitted_vae(out: Path, phantom: Path, plan: DemoPlan) -> Path:
    """The tiny VAE fitted to the phantom images, once, in `out/vae` (every base model shares it, so one
    prepared folder serves them all: its latents' VAE fingerprint matches each)."""
    from cxrdiff.artifacts import atomic_dir
    from cxrdiff.model.tiny import TinySpec, tiny_components

    path = out / "vae"
    if (path / "config.json").is_file():
        return path
    vae = tiny_components(TinySpec(resolution=plan.resolution), seed=plan.seed).vae
    images = _phantom_images(phantom, plan.resolution, limit=512)
    fit_vae(vae, images, plan.vae_steps, seed=plan.seed, batch_size=plan.vae_batch_size)
    vae.register_to_config(scaling_factor=scale_to_unit_variance(vae, images))
    with atomic_dir(path) as tmp:
        vae.save_pretrained(tmp)
    return path


def _pretrain_phantom(out: Path, plan: DemoPlan) -> Path:
    """The second phantom draw (another seed) the text encoders are pretrained on, so that the fine-tuning
    images and reports are not the pretraining ones."""
    from cxrdiff.phantom import PhantomConfig, make_phantom

    pairs = out / "phantom-pretrain"
    seed = plan.seed + PRETRAIN_SEED_OFFSET
    make_phantom(
        PhantomConfig(pairs, patients=plan.pretrain_patients, seed=seed, size=plan.image_size, dicom_fraction=0.0)
    )
    return pairs


def _pretraining(out: Path, plan: DemoPlan) -> dict[str, Any]:
    """The options both pretraining commands get in the demo: the pretraining phantom, the plan's steps and seed."""
    data = _pretrain_phantom(out, plan)
    return {"data": data, "steps": plan.pretrain_steps, "batch_size": plan.pretrain_batch_size, "seed": plan.seed}


def _pretrained_bert(out: Path, plan: DemoPlan) -> Path:
    """`cxrdiff model pretrain-bert` on the pretraining phantom: a tiny BERT (masked language modelling, the
    objective chosen before any run) for the `--text-encoders bert` runs."""
    from cxrdiff.model.pretrain_bert import PretrainBertConfig, pretrain_bert

    result = pretrain_bert(PretrainBertConfig(out=out / "tiny-bert", **_pretraining(out, plan)))
    top1, majority = result["masked_top1"], result["majority"]
    log.info("BERT pretrained: held-out masked-token top-1 %.3f (most frequent token %.3f)", top1, majority)
    return out / "tiny-bert"


def _pretrained_text(out: Path, plan: DemoPlan) -> Path:
    """`cxrdiff model pretrain-text` on the pretraining phantom."""
    from cxrdiff.model.pretrain_text import PretrainTextConfig, pretrain_text

    config = PretrainTextConfig(out=out / "text-encoder", resolution=plan.resolution, **_pretraining(out, plan))
    result = pretrain_text(config)
    log.info("text encoder pretrained: held-out retrieval top-1 %.3f (chance %.3f)", result["retrieval_top1"],
             result["chance"])  # fmt: skip
    return out / "text-encoder"


def _base_model(out: Path, init: str, vae: Path, text_encoder: Path | None, plan: DemoPlan) -> Path:
    """The tiny base model of one text init: the fitted VAE, a seeded random UNet (the same for every init)
    and the pretrained text encoder or a token-local random one (skipped when already written)."""
    from diffusers import AutoencoderKL

    from cxrdiff.model.tiny import TinySpec, tiny_components
    from cxrdiff.models import save_components
    from cxrdiff.text_encoders import load_text_encoder

    base = out / f"base-model-{init}"
    if (base / "model_index.json").is_file():
        return base
    spec = TinySpec(resolution=plan.resolution, token_local_text=init == "token-local")
    encoder = load_text_encoder(text_encoder, spec.text_width) if init == "pretrained" else None
    comps = tiny_components(spec, seed=plan.seed, text_encoder=encoder)
    comps.vae = AutoencoderKL.from_pretrained(vae, local_files_only=True)
    save_components(comps, base)
    return base


def run_names(inits: tuple[str, ...], lora_rank: int | None = None) -> dict[tuple[str, str], str]:
    """(init, frozen|learnable) → the report's name: the paper's Finetune_F / Finetune_L for the pretrained
    encoder (its analogue of SD2's), the init named beside it otherwise; with `lora_rank`, also (init,
    frozen-lora|learnable-lora) → 'Finetune_F + LoRA r16' (UNet adapters; learnable: the text encoder's too)."""
    names = {}
    for init in inits:
        for kind, short in (("frozen", "F"), ("learnable", "L")):
            names[init, kind] = f"Finetune_{short}" if init == "pretrained" else f"Finetune_{short} ({init})"
        if lora_rank is not None:
            for kind in ("frozen", "learnable"):
                full = names[init, kind]
                lora = f"LoRA r{lora_rank}"
                names[init, f"{kind}-lora"] = f"{full[:-1]}, {lora})" if full.endswith(")") else f"{full} + {lora}"
    return names


def demo(
    out: Path = Path("cxrdiff-demo"),
    quick: bool = False,
    text_init: str = "pretrained",
    trainings: int = 1,
    text_encoders: tuple[str, ...] = ("clip",),
    lora: bool = False,
) -> dict[str, Any]:
    """Run the chain; every step skips what an earlier (or interrupted) demo already finished.

    `text_init`: pretrained (the default), token-local, or both (side by side in one report);
    `trainings`: fine-tunings per model, seeds 0..N-1 (the report's ± over trainings);
    `text_encoders`: clip (the tiny CLIP of `text_init`), bert (a tiny BERT pretrained on the reports, fine-tuned
    frozen and learnable from the same base model through `finetune --text-encoder`), or both; `lora`: LoRA runs
    (rank `DemoPlan.lora_rank`) beside the full CLIP fine-tunes, frozen and learnable, as many trainings each."""
    from cxrdiff.console import err

    if text_init not in (*TEXT_INITS, "both"):
        raise InputError(f"--text-init {text_init!r}: expected one of {', '.join(TEXT_INITS)}, both")
    if trainings < 1:
        raise InputError(f"--trainings {trainings}: expected at least 1")
    unknown = [e for e in text_encoders if e not in TEXT_ENCODERS]
    if unknown or not text_encoders:
        raise InputError(f"--text-encoders {','.join(text_encoders)}: expected some of {', '.join(TEXT_ENCODERS)}")
    inits = TEXT_INITS if text_init == "both" else (text_init,)
    plan = DemoPlan.quick() if quick else DemoPlan()
    out = Path(out)
    if (out / MANIFEST).is_file():
        kind = read_manifest(out).get("step")
        raise InputError(f"--out {out}: is a '{kind}' folder; the demo needs a folder of its own")
    out.mkdir(parents=True, exist_ok=True)
    clock = _Stages()

    err.rule(f"cxrdiff demo{' --quick' if quick else ''}: phantom data ({plan.patients} patients)")
    phantom = _phantom(out, plan)
    clock.done("phantom")
    text_encoder = None
    if "pretrained" in inits:
        err.rule(f"text encoder: contrastive pretraining on another phantom draw ({plan.pretrain_steps} steps)")
        text_encoder = _pretrained_text(out, plan)
        clock.done("pretrain text")
    bert = None
    if "bert" in text_encoders:
        err.rule(f"text encoder: a tiny BERT, masked language modelling on the reports ({plan.pretrain_steps} steps)")
        bert = _pretrained_bert(out, plan)
        clock.done("pretrain BERT")
    err.rule("tiny base model (VAE fitted to the phantom images)")
    vae = _fitted_vae(out, phantom, plan)
    bases = {init: _base_model(out, init, vae, text_encoder, plan) for init in inits}
    clock.done("base model")
    err.rule("prepare")
    prepared = _prepare(out, phantom, bases[inits[0]], plan)
    clock.done("prepare")
    clip_inits = inits if "clip" in text_encoders else ()
    models = len(clip_inits) * (4 if lora else 2) + (2 if bert else 0)
    err.rule(f"finetune: {models} models × {trainings} trainings, {plan.finetune_steps} steps each")
    runs, jobs = planned_runs(out, prepared, bases, clip_inits, trainings, plan, lora=lora, bert=bert)
    finetune_all(jobs)
    clock.done("finetune")
    err.rule("phantom pathology classifier (fidelity features and classifier check)")
    classifier = _classifier(out, prepared, plan)
    clock.done("classifier")
    err.rule("sample, ground and report")
    result = _report(out, runs, prepared, classifier, plan)
    clock.done("sample, ground, report")
    summary = _summary(out / "report" / "metrics.json")
    total = clock.total()
    err.print(f"demo finished in {total:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in clock.timings.items()))
    for name, numbers in summary.items():
        err.print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in numbers.items()))
    return {
        "seconds": total,
        "timings": clock.timings,
        "summary": summary,
        "recomputed": result["recomputed"],
        "report": result["report"],
    }


class _Stages:
    """Seconds per stage of the demo."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name], self.last = round(now - self.last, 1), now

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 1)


def _phantom(out: Path, plan: DemoPlan) -> Path:
    from cxrdiff.phantom import PhantomConfig, make_phantom

    phantom = out / "phantom"
    make_phantom(
        PhantomConfig(
            phantom, patients=plan.patients, seed=plan.seed, size=plan.image_size, dicom_fraction=0.1, preview=True
        )
    )
    return phantom


def _prepare(out: Path, phantom: Path, base: Path, plan: DemoPlan) -> Path:
    from cxrdiff.prepare import PrepareConfig, prepare

    prepared = out / "prepared"
    prepare(
        PrepareConfig(
            mimic=phantom,
            reports=phantom,
            ms_cxr=phantom / "MS_CXR_Local_Alignment_v1.0.0.csv",
            base_model=base,
            out=prepared,
            test_size=plan.test_size,
            seed=plan.seed,
        )
    )
    return prepared


def planned_runs(
    out: Path,
    prepared: Path,
    bases: dict[str, Path],
    inits: tuple[str, ...],
    trainings: int,
    plan: DemoPlan,
    lora: bool = False,
    bert: Path | None = None,
) -> tuple[dict[str, list[Path]], list[Any]]:
    """Every fine-tuning of the demo: each model `trainings` times (seeds 0..N-1) on impressions and, with
    N ≥ 2, once more (seed 0) on the class labels (Table 7 measured); with `lora`, the LoRA models on
    impressions only; with `bert`, the BERT-conditioned pair (frozen, learnable) from the first base model, on
    impressions. Returns the report's groups and the configs to train."""
    runs: dict[str, list[Path]] = {}
    jobs = []
    for (init, kind), name in run_names(inits, plan.lora_rank if lora else None).items():
        text, _, lora_kind = kind.partition("-")
        rank = plan.lora_rank if lora_kind else None
        tag = f"{text}-lora{rank}" if rank else text
        variants = [(name, f"{init}-{tag}-seed{seed}", seed, "impression") for seed in range(trainings)]
        if trainings > 1 and not rank:
            variants.append((f"{name} (labels)", f"{init}-{tag}-labels-seed0", 0, "labels"))
        for group, folder, seed, source in variants:
            config = _finetune_config(
                out / "runs" / folder, prepared, bases[init], text == "frozen", plan, seed, source
            )
            jobs.append(dataclasses.replace(config, lora_rank=rank))
            runs.setdefault(group, []).append(out / "runs" / folder)
    if bert is not None:
        base = next(iter(bases.values()))
        for kind, name in BERT_NAMES.items():
            for seed in range(trainings):
                folder = out / "runs" / f"bert-{kind}-seed{seed}"
                config = _finetune_config(folder, prepared, base, kind == "frozen", plan, seed, "impression")
                jobs.append(dataclasses.replace(config, text_encoder=bert))
                runs.setdefault(name, []).append(folder)
    return dict(sorted(runs.items(), key=lambda item: "(labels)" in item[0])), jobs


def finetune_all(configs: list[Any]) -> None:
    """Fine-tune every config not finished yet, side by side on a multi-core CPU (`speed.side_by_side`).
    Each run is its own resumable step folder, so an interrupted demo resumes them all."""
    from cxrdiff.finetune import finetune
    from cxrdiff.speed import side_by_side

    side_by_side(finetune, [(c,) for c in configs if not (Path(c.out) / MANIFEST).is_file()])


def _finetune_config(
    run: Path, prepared: Path, base: Path, frozen: bool, plan: DemoPlan, seed: int, prompt_source: str
) -> Any:
    from cxrdiff.finetune import FinetuneConfig

    return FinetuneConfig(
        data=prepared,
        base_model=base,
        out=run,
        frozen_text=frozen,
        steps=plan.finetune_steps,
        batch_size=plan.batch_size,
        lr=plan.lr,
        seed=seed,
        prompt_source=prompt_source,
        checkpoint_every=max(plan.finetune_steps // 2, 1),
        log_every=25,
    )


def _classifier(out: Path, prepared: Path, plan: DemoPlan) -> Any:
    """The phantom pathology classifier: trained once, then loaded from the demo folder."""
    from cxrdiff.metrics.classifier import PhantomClassifier, train_phantom_classifier

    path = out / "classifier" / "phantom_classifier.safetensors"
    if path.is_file():
        return PhantomClassifier.load(path)
    images, labels = _train_images(prepared, plan.resolution)
    classifier = train_phantom_classifier(images, labels, seed=plan.seed)
    classifier.save(path)
    return classifier


def _report(out: Path, runs: dict[str, list[Path]], prepared: Path, classifier: Any, plan: DemoPlan) -> dict[str, Any]:
    """The report over every run, one name per run and a label per model (its trainings grouped); Table 6's
    threshold scaled to the phantom's phrase set (the report names it)."""
    import pyarrow.parquet as pq

    from cxrdiff.report import ReportConfig, report
    from cxrdiff.report.published import scaled_min_word_count
    from cxrdiff.speed import cpu_cores

    phrases = pq.read_metadata(prepared / "ms_cxr.parquet").num_rows

    config = ReportConfig(
        runs=tuple(run for group in runs.values() for run in group),
        names=tuple(
            name if len(group) == 1 else f"{name} seed {seed}"
            for name, group in runs.items()
            for seed in range(len(group))
        ),
        label=tuple(f"{name}={group[0]}" for name, group in runs.items()),
        out=out / "report",
        real=prepared,
        n_fid=plan.n_fid,
        diversity_prompts=plan.diversity_prompts,
        fid=False,
        fid_xrv=False,
        sample_steps=plan.sample_steps,
        ground_steps=plan.ground_steps,
        ground_window=plan.ground_window,
        min_word_count=scaled_min_word_count(phrases),
        classifier_prompts_per_class=plan.classifier_prompts_per_class,
        seed=plan.seed,
        batch_size=16,
        # every experiment with --trainings ≥ 2: the curve over training and Table 4's MS-CXR column
        checkpoints=any(len(group) > 1 for group in runs.values()),
        table4_p19_only=all(len(group) == 1 for group in runs.values()),
        workers=cpu_cores(),  # side by side on a multi-core CPU, as the fine-tunes
        # today's benchmarks and the privacy section on the phantom classifier's features and the pixels, kept to
        # seconds: classes of 10 images or more, the memorization score on 4 prompts, one noise draw, few steps
        min_class_images=10,
        privacy_pairs=4,
        memorization_prompts=4,
        memorization_noise=1,
        memorization_steps=plan.sample_steps,
    )
    return report(config, classifier=classifier)


def _summary(metrics_path: Path) -> dict[str, Any]:
    """The headline numbers per run, each with its 95% interval (a bootstrap over the run's phrases or images;
    never a "± 0.00" for a single training), and the report's verdicts in one line each: with one training per
    model no verdict word, the difference over this training's phrases or images instead."""
    import json

    from cxrdiff.report.verdicts import overall, summary_words

    metrics = json.loads(metrics_path.read_text())
    summary: dict[str, Any] = {}
    for name, run in metrics["runs"].items():
        average = run["grounding"].get("average") or {}
        intervals = (run.get("grounding_intervals") or {}).get("average") or {}
        numbers = {
            label: _with_interval(average[key]["mean"], intervals.get(key), 2)
            for key, label in (("cnr", "CNR"), ("auc_roc", "AUC-ROC"), ("top1", "Top-1"))
            if key in average
        }
        laterality = run.get("laterality") or {}
        if laterality.get("measured"):
            mean = laterality.get("mean")
            numbers["laterality"] = (
                _with_interval(mean["value"], mean, 2) if mean else f"too few ({laterality.get('n', 0)})"
            )
        for score in run.get("fidelity", []):
            numbers[score["name"]] = _with_interval(score["value"], score.get("interval"), 2)
        if run.get("diversity"):
            numbers["MS-SSIM %"] = _with_interval(run["diversity"]["value"], run["diversity"].get("interval"), 1)
        summary[name] = numbers
    for v in metrics.get("verdicts") or []:
        sides = {s["side"]: summary_words(s) for s in v["sides"]}
        said = v.get("overall") or overall(v["sides"])
        summary[f"verdict: {v['frozen']} vs {v['learnable']}"] = {**sides, "trade-off": said}
    return summary


def _with_interval(value: float, interval: dict[str, Any] | None, digits: int) -> str:
    bounds = interval and interval.get("low") is not None and interval.get("high") is not None
    text = f"{value:.{digits}f}"
    return text + (f" [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]" if bounds else "")
