"""The `cxrdiff` command line: options → a config → one call into the Python API → print the result.

Heavy libraries (torch, diffusers) are imported inside the commands, so `--help` and shell
completion stay instant. Results go to stdout (`--json` for machines); progress and logs to stderr; a fault
is one line on stderr and an exit code, Ctrl-C included (see `main`).
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from cxrdiff import __version__
from cxrdiff.cli_options import (
    STEP_CONFIGS,
    ChannelsLast,
    CheckpointEvery,
    Choice,
    Compile,
    ConfigOpt,
    DistTimeoutOpt,
    FinalizeOpt,
    MinWordCount,
    PretrainLr,
    PretrainMsCxr,
    PretrainSteps,
    PretrainWeightDecay,
    ReportTextFallback,
    ShardOpt,
    StepGroup,
    Tf32,
    opt,
)
from cxrdiff.errors import INTERRUPTED, failure

app = typer.Typer(
    cls=StepGroup,
    name="cxrdiff",
    help="Fine-tune Stable Diffusion on chest X-rays and measure both accuracy (fidelity) and interpretability "
    "(phrase grounding from cross-attention).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
model_app = typer.Typer(cls=StepGroup, help="Build and inspect base-model folders.", no_args_is_help=True)
app.add_typer(model_app, name="model")

_state = {"json": False}


def _version(value: bool) -> None:
    if value:
        print(f"cxrdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only errors on stderr.")] = False,
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="More logs; -vv for debug.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    from cxrdiff.console import quiet_libraries, set_verbosity

    set_verbosity(-1 if quiet else verbose)
    quiet_libraries(-1 if quiet else verbose)
    _state["json"] = as_json


def run_step(step: Callable[[Any], Any], config_class: type, options: dict[str, Any]) -> Any:
    """Build `config_class` from defaults < `--config` TOML < the flags given (`options`, a command's
    locals), call the step with it, and print what it returns."""
    from cxrdiff.config import load_config

    options = dict(options)
    config_file = options.pop("config", None)
    flags = {name: _plain(value) for name, value in options.items()}
    result = step(load_config(config_class, config_file, **flags))
    print_result(result)
    return result


def _plain(value: Any) -> Any:
    """Typer's values as the config expects them: an enum's value, a repeated option as a tuple."""
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, list):
        return tuple(value) or None
    return value


def print_result(result: Any) -> None:
    if result is None:
        return
    if _state["json"]:
        print(json.dumps(result, indent=2, default=str))
    elif isinstance(result, dict):
        for key, value in result.items():
            if isinstance(value, (str, int, float, Path)) or value is None:
                print(f"{key}: {value}")
    else:
        print(result)


# --- commands -------------------------------------------------------------------------------
# A step command is a signature of options named after its config's fields, registered by `step_command`. Adding an
# option is one line, `name: int | None = opt("What it does.")`: it defaults to None, so that a `--config` TOML value
# is kept unless the flag is given, and `--help` shows the config's default. Options that several commands share are
# declared once below. Choices are enums of the Literals in `cxrdiff.choices`, which the configs use too.


def step_command(group: typer.Typer, name: str, target: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register `options` (a signature and a docstring) as command `name` of `group`: the flags given, with
    `--config`, build the config class that STEP_CONFIGS names and go to `target` ("module:function")."""
    module_name, function = target.split(":")

    def register(options: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(options)
        def command(**flags: Any) -> None:
            module = importlib.import_module(module_name)
            run_step(getattr(module, function), getattr(module, STEP_CONFIGS[name][1]), flags)

        group.command(name)(command)
        return command

    return register


@step_command(app, "phantom", "cxrdiff.phantom:make_phantom")
def phantom(
    out: Annotated[Path, typer.Argument(help="Folder to write the MIMIC-CXR-shaped tree to.")],
    patients: int | None = opt("Number of patients (spread over p10..p19)."),
    seed: int | None = opt("Same seed, byte-identical tree."),
    size: int | None = opt("Image size in pixels (short side)."),
    dicom_fraction: float | None = opt("Fraction of images also written as DICOM."),
    preview: bool | None = opt("Also write preview.png: one example per finding, with boxes.", "--preview"),
    workers: int | None = opt("Image-rendering processes (default: from the CPUs)."),
    kind: Choice.PhantomKind | None = opt(
        "mimic: a MIMIC-CXR-shaped tree; coco: a COCO-layout set (--patients = train images)."
    ),
    config: ConfigOpt = None,
) -> None:
    """Write a synthetic, MIMIC-CXR-shaped data set with reports and MS-CXR-style boxes (or, --kind coco, a
    captioned, segmented set in COCO's layout)."""


@step_command(app, "prepare", "cxrdiff.prepare:prepare")
def prepare(
    mimic: Path | None = opt("MIMIC-CXR-JPG (or DICOM) root with files/ and CSVs."),
    reports: Path | None = opt("Report root (files/pXX/...); default: --mimic. openi: your NLMCXR_reports.tgz."),
    ms_cxr: Path | None = opt("MS_CXR_Local_Alignment CSV.", "--ms-cxr"),
    base_model: Path | None = opt("Local diffusers SD folder whose VAE encodes."),
    out: Path | None = opt("Output folder."),
    resolution: int | None = opt("Image size; default: the model's."),
    test_size: int | None = opt("Studies in the p19 test prompt set."),
    seed: int | None = opt("Seed for the test sample."),
    batch_size: int | None = opt("Images per VAE batch."),
    shard_size: int | None = opt("Rows per train shard."),
    exclude_ms_cxr_patients: bool | None = opt("Drop every patient with an MS-CXR image.", "--exclude-ms-cxr-patients"),
    test_no_finding_max: float | None = opt("At most this fraction of the test prompts are 'No Finding' ."),
    workers: int | None = opt("Image-decoding processes per GPU (default: from CPUs)."),
    text_fallback: Choice.TextFallback | None = opt(
        "Text for reports without IMPRESSION (default none: dropped, as the paper)."
    ),
    dicom_contrast: Choice.DicomContrast | None = opt(
        "DICOM → 8 bit: mimic-jpg (MIMIC-CXR-JPG's conversion, default) or window (the file's)."
    ),
    format: Choice.DataFormat | None = opt(
        "Input data set: mimic (default), coco (--coco), nih, openi or csv (--images; docs/public-sets.md)."
    ),
    images: Path | None = opt("nih/openi/csv: the image folder."),
    table: Path | None = opt("nih/openi: your copy of the label/metadata table; csv: the table."),
    boxes: Path | None = opt("nih: your BBox list; csv: image, phrase, x, y, w, h."),
    test_fraction: float | None = opt("nih/openi/csv: share of patients drawn for test."),
    coco: Path | None = opt("COCO root: annotations/{captions,instances}_{split}.json and {split}/."),
    coco_splits: str | None = opt("TRAIN,TEST split names (TEST = the test set)."),
    coco_words: Path | None = opt("CSV (category, word): synonyms that also name a category in a caption."),
    coco_val_fraction: float | None = opt("Share of TRAIN held out as validation, seeded (the paper's)."),
    shard: ShardOpt = None,
    finalize: FinalizeOpt = None,
    dist_timeout: DistTimeoutOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Turn MIMIC-CXR + reports + MS-CXR (or COCO, NIH ChestX-ray14, Open-i, any image-text CSV) into latent shards."""


@step_command(app, "finetune", "cxrdiff.finetune:finetune")
def finetune(
    data: Path | None = opt("A `cxrdiff prepare` output folder."),
    base_model: Path | None = opt("Local diffusers SD folder to start from."),
    out: Path | None = opt("Run folder (re-run the same command to resume)."),
    frozen_text: bool | None = opt("Freeze the text encoder (_F) or train it (_L).", "--frozen-text/--learnable-text"),
    text_encoder: Path | None = opt(
        "Condition on this local Hugging Face text model folder (CXR-BERT, RadBERT, BiomedCLIP, ...) "
        "instead of the base model's CLIP; a linear map to the UNet's width is learnt where widths differ."
    ),
    trust_remote_code: bool | None = opt("Let --text-encoder run its folder's own model code.", "--trust-remote-code"),
    steps: int | None = opt("Optimizer steps; default 30,000 frozen / 60,000 learnable."),
    batch_size: int | None = opt("Global batch (per device × processes × accumulation)."),
    per_device_batch_size: int | None = opt("Batch per device per micro-step; default: the largest ≤ 16 that divides."),
    lr: float | None = opt("Learning rate (constant)."),
    text_lr: float | None = opt("Text encoder learning rate; default: --lr."),
    ucg_no_finding: float | None = opt("P(empty prompt) for samples whose only label is No Finding."),
    ucg_caption: float | None = opt("COCO data: P(empty prompt) for any caption."),
    prompt_source: str | None = opt("impression | labels | file:PATH"),
    mixed_precision: Choice.Precision | None = opt("Mixed precision of training."),
    gradient_checkpointing: bool | None = opt("Recompute activations in backward.", "--gradient-checkpointing"),
    checkpoint_every: CheckpointEvery = None,
    keep_checkpoints: int | None = opt("Keep the last K checkpoints."),
    ema: bool | None = opt("Keep an EMA of the UNet.", "--ema"),
    export_weights: Choice.ExportWeights | None = opt("Which UNet weights the output folder holds (raw: the paper)."),
    max_grad_norm: float | None = opt("Clip gradients to this norm (0: off)."),
    snr_gamma: float | None = opt("Min-SNR loss weighting gamma (default off)."),
    latent_sampling: Choice.LatentSampling | None = opt("sample (paper: fresh latent from the posterior) or its mean."),
    log_every: int | None = opt("Log loss, lr, images/s and memory every N steps."),
    validation_prompts: list[str] | None = opt("Prompt rendered during training (repeatable).", "--validation-prompt"),
    validate_every: int | None = opt("Render the validation prompts every N steps."),
    seed: int | None = opt("Initialisation, batch order and noise."),
    compile: Compile = None,
    tf32: Tf32 = None,
    channels_last: ChannelsLast = None,
    fused_adamw: bool | None = opt("The fused AdamW kernel.", "--fused-adamw"),
    lora_rank: int | None = opt("Train rank-R LoRA adapters instead of every weight (default: full)."),
    lora_alpha: float | None = opt("LoRA scale alpha / rank; default: the rank."),
    lora_dropout: float | None = opt("Dropout on the LoRA adapters' input."),
    lora_targets: list[str] | None = opt("UNet module (name or suffix) to adapt; repeat for several.", "--lora-target"),
    text_lora_rank: int | None = opt("With --learnable-text: the text encoder's LoRA rank; default: --lora-rank."),
    deid_markers: Choice.DeidMarkers | None = opt(
        'MIMIC\'s "___" de-identification markers in the training text: keep (paper) or strip.'
    ),
    allow_world_change: bool | None = opt(
        "Resume a checkpoint of another process count (default: refused).", "--allow-world-change"
    ),
    report_to: Choice.ReportTo | None = opt("Metrics tracker; auto: tensorboard if installed; wandb runs offline."),
    config: ConfigOpt = None,
) -> None:
    """Fine-tune the UNet (and, with --learnable-text, the text encoder) on prepared latents; with --lora-rank,
    LoRA adapters of them."""


@step_command(app, "sample", "cxrdiff.sample:sample")
def sample(
    model: Path | None = opt("Model folder (finetune output or base model)."),
    out: Path | None = opt("Output folder (re-run to complete)."),
    prompts: Path | None = opt("test.parquet from `cxrdiff prepare`."),
    prompts_file: Path | None = opt("Text file, one prompt per line."),
    prompt: str | None = opt("A single prompt."),
    n_per_prompt: int | None = opt("Images per prompt (4 for MS-SSIM diversity)."),
    steps: int | None = opt("Denoising steps."),
    guidance: float | None = opt("Classifier-free guidance scale (the paper's images: 4)."),
    scheduler: Choice.Scheduler | None = opt("Sampler (pndm: PLMS, the paper's)."),
    seed: int | None = opt("Base seed; each image's seed derives from it."),
    batch_size: int | None = opt("Images per batch."),
    limit: int | None = opt("Only the first N prompts (default: all)."),
    prompt_column: str | None = opt("Column of --prompts holding the text."),
    mixed_precision: Choice.SamplePrecision | None = opt("auto: bf16 on CUDA, fp32 on CPU."),
    compile: Compile = None,
    tf32: Tf32 = None,
    channels_last: ChannelsLast = None,
    shard: ShardOpt = None,
    finalize: FinalizeOpt = None,
    dist_timeout: DistTimeoutOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Generate images with classifier-free guidance, reproducible per prompt."""


@step_command(app, "ground", "cxrdiff.ground:ground")
def ground(
    model: Path | None = opt("Model folder."),
    out: Path | None = opt("Output folder."),
    data: Path | None = opt("ms_cxr.parquet from `cxrdiff prepare`."),
    image: Path | None = opt("A single image (PNG/JPG, or DICOM)."),
    prompt: str | None = opt("The phrase for --image."),
    word: list[str] | None = opt("Word(s) to ground; repeat for several."),
    steps: int | None = opt("DDIM steps."),
    window: int | None = opt("Average the last N steps."),
    mode: Choice.GroundMode | None = opt("noise (paper) or invert (DDIM inversion)."),
    guidance: float | None = opt("Guidance scale; 1 (paper): the conditional pass's attention alone, not mixed."),
    seed: int | None = opt("Noise and latent draws."),
    noise_seeds: int | None = opt("Repeat the grounding with this many noise seeds; mean ± std over them."),
    cnr: Choice.CnrKind | None = opt("signed (paper) or abs (BioViL)."),
    boxes: Choice.BoxMode | None = opt("union (an image's boxes of the class, paper), per-box, or per-phrase."),
    frame: Choice.Frame | None = opt("prepared (paper, 512 crop) or the original image frame."),
    limit: int | None = opt("Only the first N samples (default: all)."),
    batch_size: int | None = opt("Images per UNet batch."),
    min_word_count: MinWordCount = None,
    latent: Choice.LatentSampling | None = opt("sample (a seeded posterior draw, paper) or mean."),
    allow_scaling_mismatch: bool | None = opt(
        "Ground latents prepared with another VAE scaling factor.", "--allow-scaling-mismatch"
    ),
    compile: Compile = None,
    tf32: Tf32 = None,
    channels_last: ChannelsLast = None,
    shard: ShardOpt = None,
    finalize: FinalizeOpt = None,
    dist_timeout: DistTimeoutOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Ground words of a phrase in an image from the UNet's cross-attention; score against boxes."""


@step_command(app, "report", "cxrdiff.report:report")
def report(
    runs: Annotated[list[Path] | None, typer.Argument(help="Run folders (finetune outputs or base models).")] = None,
    out: Path | None = opt("Report folder."),
    real: Path | None = opt("Prepared folder with the real p19 test images."),
    inception_weights: Path | None = opt("InceptionV3 FID weights file."),
    xrv_weights: Path | None = opt("torchxrayvision densenet121-res224-all file."),
    n_fid: int | None = opt("Images per side for FID."),
    diversity_prompts: int | None = opt("Prompts × 4 images for MS-SSIM."),
    random_features: bool | None = opt("Allow untrained feature nets (labelled, not FID).", "--random-features"),
    classifier_positives: Choice.ClassifierPositives | None = opt(
        "only: images whose only label is d (paper); any: every image labelled d."
    ),
    classifier_prompts_per_class: int | None = opt(
        "Classifier check on its own set: K prompts per class and K No Finding (default: p19)."
    ),
    min_word_count: MinWordCount = None,
    checkpoints: bool | None = opt("Also measure each run's kept checkpoints (curves).", "--checkpoints"),
    table4_p19_only: bool | None = opt("Fidelity from p19 prompts only (not MS-CXR phrases).", "--table4-p19-only"),
    other_sources: Choice.OtherSources | None = opt(
        "Runs trained on labels / file: texts: grounding (Table 7 only, paper) or full."
    ),
    checkpoint_every: int | None = opt("With --checkpoints: every Nth kept checkpoint, the newest always in."),
    label: list[str] | None = opt(
        "NAME=DIR: name the group of runs trained like DIR (repeatable; groups: all but the seed)."
    ),
    workers: int | None = opt("Runs measured side by side on a multi-core CPU (one process each)."),
    features: list[str] | None = opt(
        "Feature network for FD, KID, precision/recall/density/coverage: inception, xrv, classifier, hf:DIR "
        "or hf:NAME=DIR (a local Hugging Face model, e.g. RadDino; CLS token). Repeatable; default: the FDs' own."
    ),
    min_class_images: int | None = opt("Per-class metrics where real and generated images each number this many."),
    kid_subsets: int | None = opt("KID: random subsets averaged."),
    kid_subset_size: int | None = opt("KID: images per subset (clipped to the sets)."),
    prdc_k: int | None = opt("Precision/recall/density/coverage neighbourhood k."),
    no_privacy: bool | None = opt("Skip the privacy section (nearest training images).", "--no-privacy"),
    privacy_features: str | None = opt("Network of the nearest-training search (a --features value; default: first)."),
    privacy_max_train: int | None = opt("Search a seeded sample of N training images (default: all)."),
    privacy_quantile: float | None = opt("Copy threshold: this quantile of held-out test images' similarities."),
    privacy_pixels: int | None = opt("Pixel correlation at this image size."),
    privacy_pairs: int | None = opt("Closest pairs shown per run and measure."),
    memorization_prompts: int | None = opt("Memorization score: training prompts (and as many held-out; 0: off)."),
    memorization_noise: int | None = opt("Memorization score: noise draws per prompt."),
    memorization_steps: int | None = opt("Memorization score: DDIM steps averaged."),
    emit_jobs: Path | None = opt(
        "Write the sample/ground command of every sub-folder here (one a line) and run nothing."
    ),
    config: ConfigOpt = None,
) -> None:
    """Measure both sides of the trade-off and write report.md / report.html / metrics.json."""


@step_command(model_app, "pretrain-text", "cxrdiff.model.pretrain_text:pretrain_text")
def model_pretrain_text(
    data: Annotated[
        Path, typer.Argument(help="MIMIC-CXR-shaped folder (metadata CSV, files/ with images and reports).")
    ],
    out: Annotated[Path, typer.Argument(help="New folder for text_encoder/ + tokenizer/.")],
    ms_cxr: PretrainMsCxr = None,
    text_fallback: ReportTextFallback = None,
    resolution: int | None = opt("Image size the image tower sees."),
    text_width: int | None = opt("Text encoder width."),
    text_layers: int | None = opt("Text encoder layers."),
    text_heads: int | None = opt("Text encoder attention heads."),
    steps: PretrainSteps = None,
    batch_size: int | None = opt("Image–text pairs per batch."),
    lr: PretrainLr = None,
    weight_decay: PretrainWeightDecay = None,
    held_out: int | None = opt("Pairs (whole patients) kept out for the retrieval check."),
    max_pairs: int | None = opt("Use at most this many pairs (default: all)."),
    checkpoint_every: CheckpointEvery = None,
    seed: int | None = opt("Initialisation, split and batch order."),
    config: ConfigOpt = None,
) -> None:
    """CLIP-style contrastive pretraining of a tiny text encoder (and a throw-away image tower) on image–report
    pairs; prints held-out retrieval accuracy beside chance."""


@step_command(model_app, "pretrain-bert", "cxrdiff.model.pretrain_bert:pretrain_bert")
def model_pretrain_bert(
    data: Annotated[Path, typer.Argument(help="MIMIC-CXR-shaped folder (metadata CSV, files/ with reports).")],
    out: Annotated[Path, typer.Argument(help="New folder for the Hugging Face text model (and its tokenizer).")],
    ms_cxr: PretrainMsCxr = None,
    text_fallback: ReportTextFallback = None,
    width: int | None = opt("Hidden size."),
    layers: int | None = opt("Transformer layers."),
    heads: int | None = opt("Attention heads."),
    vocab_size: int | None = opt("WordPiece vocabulary size (trained on the texts)."),
    context_length: int | None = opt("Token positions (the encoder's context)."),
    steps: PretrainSteps = None,
    batch_size: int | None = opt("Texts per batch."),
    lr: PretrainLr = None,
    weight_decay: PretrainWeightDecay = None,
    mask_probability: float | None = opt("Share of word tokens masked (BERT: 0.15)."),
    held_out: int | None = opt("Texts (whole patients) kept out for the check."),
    max_pairs: int | None = opt("Use at most this many reports (default: all)."),
    checkpoint_every: CheckpointEvery = None,
    seed: int | None = opt("Initialisation, split, batch order and masks."),
    config: ConfigOpt = None,
) -> None:
    """Masked-language-model pretraining of a tiny BERT (WordPiece vocabulary trained too) on report texts, for
    `finetune --text-encoder`; prints held-out masked-token accuracy beside the most-frequent-token guess."""


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for every artifact of the demo.")] = Path("cxrdiff-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A smaller run (about 2 minutes on 2 CPU cores).")] = False,
    text_init: Annotated[
        Choice.TextInit,
        typer.Option(help="The tiny text encoder: contrastively pretrained, token-local by construction, or both."),
    ] = Choice.TextInit.pretrained,
    trainings: Annotated[
        int,
        typer.Option(
            help="Fine-tunings per model (seeds 0..N-1), for ± over trainings; a verdict needs 2+ (at the README's "
            "spread 3 detect its CNR difference with 27% power, 7 with 80%)."
        ),
    ] = 1,
    text_encoders: Annotated[
        str,
        typer.Option(
            help="Text encoders to fine-tune with, comma-separated: clip (the tiny CLIP), bert (a tiny "
            "BERT pretrained on the reports, frozen and learnable beside it)."
        ),
    ] = "clip",
    coco: Annotated[
        bool, typer.Option("--coco", help="The in-domain chain (Table 2) on a COCO-layout phantom instead.")
    ] = False,
    lora: Annotated[
        bool, typer.Option("--lora", help="LoRA fine-tunes (rank 16, frozen and learnable) beside the full ones.")
    ] = False,
) -> None:
    """Run the whole chain on phantom data and a tiny model, and write the report."""
    if coco:  # its own chain (cxrdiff.demo_coco) and folder
        from cxrdiff.demo_coco import demo_coco

        print_result(demo_coco(out=Path("cxrdiff-demo-coco") if out == Path("cxrdiff-demo") else out, quick=quick))
        return
    from cxrdiff.demo import demo as run_demo

    encoders = tuple(e.strip() for e in text_encoders.split(",") if e.strip())
    print_result(
        run_demo(
            out=out, quick=quick, text_init=text_init.value, trainings=trainings, text_encoders=encoders, lora=lora
        )
    )


@app.command()
def doctor(
    base_model: Annotated[Path | None, typer.Option(help="Base model folder to check.")] = None,
    inception_weights: Annotated[Path | None, typer.Option(help="InceptionV3 FID weights file.")] = None,
    xrv_weights: Annotated[Path | None, typer.Option(help="torchxrayvision weights file.")] = None,
    distributed: Annotated[
        bool,
        typer.Option("--distributed", help="Under accelerate launch: all-reduce, barrier, and --out's locks."),
    ] = False,
    out: Annotated[Path | None, typer.Option(help="With --distributed: the folder whose locks to check.")] = None,
    dist_timeout: DistTimeoutOpt = 1800,
) -> None:
    """Check offline what each step needs and say what is missing and where it goes (exit 1 if so)."""
    from cxrdiff.doctor import doctor as check

    result = check(base_model=base_model, inception_weights=inception_weights, xrv_weights=xrv_weights,
                   distributed=distributed, out=out, dist_timeout=dist_timeout)  # fmt: skip
    if result is None:  # another rank than the main one
        return
    print_result(result)
    if not result["ok"]:
        raise typer.Exit(1)


@model_app.command("tiny")
def model_tiny(
    out: Annotated[Path, typer.Argument(help="Folder for the diffusers pipeline.")],
    resolution: Annotated[int, typer.Option(help="Image size in pixels.")] = 64,
    unet_channels: Annotated[str, typer.Option(help="UNet block widths, comma-separated.")] = "32,64",
    text_width: Annotated[int, typer.Option(help="Text encoder width (= cross-attention dim).")] = 32,
    prediction_type: Annotated[
        Choice.PredictionType, typer.Option(help="epsilon (SD2-base) or v_prediction (SD2-768).")
    ] = Choice.PredictionType.epsilon,
    seed: Annotated[int, typer.Option(help="Weight initialisation seed.")] = 0,
    text_encoder: Annotated[
        Path | None, typer.Option(help="A `model pretrain-text` folder: its text encoder instead of a random one.")
    ] = None,
) -> None:
    """Write a tiny, randomly initialised SD2-shaped model (real CLIP vocabulary) for tests and the demo."""
    from cxrdiff.model import write_tiny

    print_result(write_tiny(out, resolution, unet_channels, text_width, prediction_type.value, seed, text_encoder))


@model_app.command("random")
def model_random(
    out: Annotated[Path, typer.Argument(help="New folder for the diffusers pipeline.")],
    like: Annotated[Choice.PublishedModel, typer.Option(help="Published architecture and configs to copy.")],
    seed: Annotated[int, typer.Option(help="Weight initialisation seed.")] = 0,
    text_encoder_like: Annotated[
        Choice.PublishedTextEncoder | None,
        typer.Option(help="Condition on a random text encoder of this shape instead (with a linear width map)."),
    ] = None,
) -> None:
    """Write a released model's exact architecture and configs with seeded random weights (no download)."""
    from cxrdiff.model import write_random

    print_result(write_random(out, like.value, seed, text_encoder_like and text_encoder_like.value))


@model_app.command("info")
def model_info(path: Annotated[Path, typer.Argument(help="Model folder.")]) -> None:
    """Print a model folder's resolution, latent shape, prediction type and sizes."""
    from cxrdiff.model import info

    print_result(info(path))


@model_app.command("checkpoint")
def model_checkpoint(
    run: Annotated[Path, typer.Argument(help="A finished `finetune` folder.")],
    out: Annotated[Path, typer.Argument(help="New folder for the checkpoint's model.")],
    step: Annotated[int, typer.Option(help="The kept checkpoint's step (checkpoints/step-NNNNNNN).")],
) -> None:
    """Export a run's kept checkpoint as a model folder that `sample`, `ground` and `report` read."""
    from cxrdiff.model import export_checkpoint

    print_result(export_checkpoint(run, step, out))


def completion_script(shell: str) -> str:
    """The shell completion script for bash, zsh or fish (what `completions/` holds)."""
    # Typer's own generator (what `--show-completion` prints), called with an explicit shell
    # instead of detecting the one this process runs under.
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name="cxrdiff", complete_var="_CXRDIFF_COMPLETE", shell=shell)


def main() -> None:
    """Entry point: every expected failure is one line on stderr and an exit code (`errors.failure` maps them:
    0 done, 75 try again (stopped by SIGTERM/SIGUSR1 at a clean point, or --out busy: a scheduler requeues), 1 the
    run failed, 2 bad usage or input, 130 Ctrl-C); -v adds the traceback.

    In `finetune` the first Ctrl-C finishes the current step, saves its checkpoint and stops with a message (exit
    130; SIGTERM/SIGUSR1 do the same with exit 75), and a second Ctrl-C aborts at once; elsewhere Ctrl-C stops at
    once. A stopped or killed step resumes when the same command is re-run.
    """
    try:
        code = app(prog_name="cxrdiff", standalone_mode=False)
    except (Exception, KeyboardInterrupt) as exc:
        message, code, traceback_too = failure(exc)
        fail(message, code, traceback_too) if message is not None else sys.exit(code)
    if code == 130:  # Typer turns a KeyboardInterrupt outside a step's own handling into Exit(130)
        fail(INTERRUPTED, 130)
    sys.exit(code if isinstance(code, int) else 0)


def fail(message: str, code: int, traceback_too: bool = True) -> NoReturn:
    """Print `error: MESSAGE` (after the traceback with -v), record the code for a batch script under torchrun /
    accelerate launch (`stopping.record_exit_code`) and exit with it."""
    from cxrdiff.console import verbosity
    from cxrdiff.stopping import record_exit_code

    if traceback_too and verbosity() > 0 and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    record_exit_code(code)
    sys.exit(code)
