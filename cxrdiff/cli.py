"""The `cxrdiff` command line: options → a config → one call into the Python API → print the result.

Heavy libraries (torch, diffusers) are imported inside the commands, so `--help` and shell
completion stay instant. Results go to stdout (`--json` for machines); progress and logs to stderr; a fault
is one line on stderr and an exit code, Ctrl-C included (see `main`).
"""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup, TyperOption

from cxrdiff import __version__, choices
from cxrdiff.errors import CxrdiffError

STEP_CONFIGS = {  # command → the file and class of its config, whose field defaults `--help` shows
    "phantom": ("phantom/config.py", "PhantomConfig"),
    "prepare": ("prepare/config.py", "PrepareConfig"),
    "finetune": ("finetune/config.py", "FinetuneConfig"),
    "sample": ("sample.py", "SampleConfig"),
    "ground": ("ground/config.py", "GroundConfig"),
    "report": ("report/config.py", "ReportConfig"),
    "pretrain-text": ("pretrain_text.py", "PretrainTextConfig"),
    "pretrain-bert": ("pretrain_bert.py", "PretrainBertConfig"),
}


def config_defaults(file: str, class_name: str) -> dict[str, Any]:
    """A config's literal field defaults, read from its source: importing the step would import numpy and
    more, and `--help` and completion must stay instant. A test checks them against the dataclass."""
    import ast

    tree = ast.parse((Path(__file__).parent / file).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    defaults: dict[str, Any] = {}
    for node in cls.body:
        if (
            isinstance(node, ast.AnnAssign)
            and node.value is not None
            and "ClassVar" not in ast.unparse(node.annotation)
        ):
            try:
                defaults[node.target.id] = ast.literal_eval(node.value)  # type: ignore[union-attr]
            except ValueError:  # not a literal (a factory): nothing to show
                continue
    return {name: value for name, value in defaults.items() if value is not None}


def show_config_defaults(command: Any, defaults: dict[str, Any]) -> None:
    """Let `--help` show each option's default from its config. The options themselves default to None so that
    a `--config` TOML value is not overridden by a flag that was never given; the config holds the real
    defaults (the paper's where they are the paper's), and this shows them. On/off flags are left as they are."""
    for param in command.params:
        if isinstance(param, TyperOption) and not param.is_flag and param.default is None and param.name in defaults:
            value = defaults[param.name]
            param.show_default = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


class StepGroup(TyperGroup):
    """Typer's group, with each step command's config defaults shown in its `--help`."""

    def get_command(self, ctx: Any, name: str) -> Any:
        command = super().get_command(ctx, name)
        if command is not None and name in STEP_CONFIGS:
            show_config_defaults(command, config_defaults(*STEP_CONFIGS[name]))
        return command


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

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML file of options (flags given here win over it).")
]

ShardOpt = Annotated[
    str | None,
    typer.Option(
        help="This job's share: I/N (0-based), or 'slurm' for an array task (SLURM_ARRAY_TASK_ID − "
        "SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT). Shards share --out; see docs/slurm.md."
    ),
]
DistTimeoutOpt = Annotated[
    int | None, typer.Option(help="Seconds a process waits for the others in a collective before failing.")
]
FinalizeOpt = Annotated[
    bool | None,
    typer.Option("--finalize", help="Only write the table and manifest of a sharded --out (every shard done)."),
]


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
# Each command: typed options named after its config's fields → `run_step(step, Config, options)`.
# Choices are enums of the Literals in `cxrdiff.choices`, which the configs use too.

Precision = choices.enum("Precision", choices.Precision)
SamplePrecision = choices.enum("SamplePrecision", choices.SamplePrecision)
Scheduler = choices.enum("Scheduler", choices.Scheduler)
ExportWeights = choices.enum("ExportWeights", choices.ExportWeights)
LatentSampling = choices.enum("LatentSampling", choices.LatentSampling)
GroundMode = choices.enum("GroundMode", choices.GroundMode)
CnrKind = choices.enum("CnrKind", choices.CnrKind)
BoxMode = choices.enum("BoxMode", choices.BoxMode)
TextFallback = choices.enum("TextFallback", choices.TextFallback)
DicomContrast = choices.enum("DicomContrast", choices.DicomContrast)
ClassifierPositives = choices.enum("ClassifierPositives", choices.ClassifierPositives)
OtherSources = choices.enum("OtherSources", choices.OtherSources)
Frame = choices.enum("Frame", choices.Frame)
PredictionType = choices.enum("PredictionType", choices.PredictionType)
PublishedModel = choices.enum("PublishedModel", choices.PublishedModel)
PublishedTextEncoder = choices.enum("PublishedTextEncoder", choices.PublishedTextEncoder)
TextInit = choices.enum("TextInit", choices.TextInit)
PhantomKind = choices.enum("PhantomKind", choices.PhantomKind)
DataFormat = choices.enum("DataFormat", choices.DataFormat)
DeidMarkers = choices.enum("DeidMarkers", choices.DeidMarkers)


@app.command()
def phantom(
    out: Annotated[Path, typer.Argument(help="Folder to write the MIMIC-CXR-shaped tree to.")],
    patients: Annotated[int | None, typer.Option(help="Number of patients (spread over p10..p19).")] = None,
    seed: Annotated[int | None, typer.Option(help="Same seed, byte-identical tree.")] = None,
    size: Annotated[int | None, typer.Option(help="Image size in pixels (short side).")] = None,
    dicom_fraction: Annotated[float | None, typer.Option(help="Fraction of images also written as DICOM.")] = None,
    preview: Annotated[
        bool | None, typer.Option("--preview", help="Also write preview.png: one example per finding, with boxes.")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Image-rendering processes (default: from the CPUs).")] = None,
    kind: Annotated[
        PhantomKind | None,
        typer.Option(help="mimic: a MIMIC-CXR-shaped tree; coco: a COCO-layout set (--patients = train images)."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Write a synthetic, MIMIC-CXR-shaped data set with reports and MS-CXR-style boxes (or, --kind coco, a
    captioned, segmented set in COCO's layout)."""
    options = dict(locals())  # the flags, before the imports below add names
    from cxrdiff.phantom import PhantomConfig, make_phantom

    run_step(make_phantom, PhantomConfig, options)


@app.command()
def prepare(
    mimic: Annotated[Path | None, typer.Option(help="MIMIC-CXR-JPG (or DICOM) root with files/ and CSVs.")] = None,
    reports: Annotated[
        Path | None, typer.Option(help="Report root (files/pXX/...); default: --mimic. openi: your NLMCXR_reports.tgz.")
    ] = None,
    ms_cxr: Annotated[Path | None, typer.Option("--ms-cxr", help="MS_CXR_Local_Alignment CSV.")] = None,
    base_model: Annotated[Path | None, typer.Option(help="Local diffusers SD folder whose VAE encodes.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder.")] = None,
    resolution: Annotated[int | None, typer.Option(help="Image size; default: the model's.")] = None,
    test_size: Annotated[int | None, typer.Option(help="Studies in the p19 test prompt set.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for the test sample.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per VAE batch.")] = None,
    shard_size: Annotated[int | None, typer.Option(help="Rows per train shard.")] = None,
    exclude_ms_cxr_patients: Annotated[
        bool | None, typer.Option("--exclude-ms-cxr-patients", help="Drop every patient with an MS-CXR image.")
    ] = None,
    test_no_finding_max: Annotated[
        float | None, typer.Option(help="At most this fraction of the test prompts are 'No Finding' .")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Image-decoding processes per GPU (default: from CPUs).")] = None,
    text_fallback: Annotated[
        TextFallback | None,
        typer.Option(help="Text for reports without IMPRESSION (default none: dropped, as the paper)."),
    ] = None,
    dicom_contrast: Annotated[
        DicomContrast | None,
        typer.Option(help="DICOM → 8 bit: mimic-jpg (MIMIC-CXR-JPG's conversion, default) or window (the file's)."),
    ] = None,
    format: Annotated[
        DataFormat | None,
        typer.Option(
            help="Input data set: mimic (default), coco (--coco), nih, openi or csv (--images; docs/public-sets.md)."
        ),
    ] = None,
    images: Annotated[Path | None, typer.Option(help="nih/openi/csv: the image folder.")] = None,
    table: Annotated[
        Path | None, typer.Option(help="nih/openi: your copy of the label/metadata table; csv: the table.")
    ] = None,
    boxes: Annotated[Path | None, typer.Option(help="nih: your BBox list; csv: image, phrase, x, y, w, h.")] = None,
    test_fraction: Annotated[
        float | None, typer.Option(help="nih/openi/csv: share of patients drawn for test.")
    ] = None,
    coco: Annotated[
        Path | None, typer.Option(help="COCO root: annotations/{captions,instances}_{split}.json and {split}/.")
    ] = None,
    coco_splits: Annotated[str | None, typer.Option(help="TRAIN,TEST split names (TEST = the test set).")] = None,
    coco_words: Annotated[
        Path | None, typer.Option(help="CSV (category, word): synonyms that also name a category in a caption.")
    ] = None,
    coco_val_fraction: Annotated[
        float | None, typer.Option(help="Share of TRAIN held out as validation, seeded (the paper's).")
    ] = None,
    shard: ShardOpt = None,
    finalize: FinalizeOpt = None,
    dist_timeout: DistTimeoutOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Turn MIMIC-CXR + reports + MS-CXR (or COCO, NIH ChestX-ray14, Open-i, any image-text CSV) into latent shards."""
    options = dict(locals())  # the flags, before the imports below add names
    from cxrdiff.prepare import PrepareConfig
    from cxrdiff.prepare import prepare as step

    run_step(step, PrepareConfig, options)


@app.command()
def finetune(
    data: Annotated[Path | None, typer.Option(help="A `cxrdiff prepare` output folder.")] = None,
    base_model: Annotated[Path | None, typer.Option(help="Local diffusers SD folder to start from.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (re-run the same command to resume).")] = None,
    frozen_text: Annotated[
        bool | None,
        typer.Option("--frozen-text/--learnable-text", help="Freeze the text encoder (Finetune_F) or train it (_L)."),
    ] = None,
    text_encoder: Annotated[
        Path | None,
        typer.Option(
            help="Condition on this local Hugging Face text model folder (CXR-BERT, RadBERT, BiomedCLIP, ...) "
            "instead of the base model's CLIP; a linear map to the UNet's width is learnt where widths differ."
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool | None,
        typer.Option("--trust-remote-code", help="Let --text-encoder run the model code shipped in its folder."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Optimizer steps; default 30,000 frozen / 60,000 learnable.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Global batch (per device × processes × accumulation).")
    ] = None,
    per_device_batch_size: Annotated[
        int | None, typer.Option(help="Batch per device per micro-step; default: the largest up to 16 that divides.")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (constant).")] = None,
    text_lr: Annotated[float | None, typer.Option(help="Text encoder learning rate; default: --lr.")] = None,
    ucg_no_finding: Annotated[
        float | None, typer.Option(help="P(empty prompt) for samples whose only label is No Finding.")
    ] = None,
    ucg_caption: Annotated[float | None, typer.Option(help="COCO data: P(empty prompt) for any caption.")] = None,
    prompt_source: Annotated[str | None, typer.Option(help="impression | labels | file:PATH")] = None,
    mixed_precision: Annotated[Precision | None, typer.Option(help="Mixed precision of training.")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Save a resumable checkpoint every N steps.")] = None,
    keep_checkpoints: Annotated[int | None, typer.Option(help="Keep the last K checkpoints.")] = None,
    ema: Annotated[bool | None, typer.Option("--ema", help="Keep an EMA of the UNet.")] = None,
    export_weights: Annotated[
        ExportWeights | None, typer.Option(help="Which UNet weights the output folder holds (raw: the paper).")
    ] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="Clip gradients to this norm (0: off).")] = None,
    snr_gamma: Annotated[float | None, typer.Option(help="Min-SNR loss weighting gamma (default off).")] = None,
    latent_sampling: Annotated[
        LatentSampling | None, typer.Option(help="sample (paper: fresh latent from the posterior) or its mean.")
    ] = None,
    log_every: Annotated[int | None, typer.Option(help="Log loss, lr, images/s and memory every N steps.")] = None,
    validation_prompts: Annotated[
        list[str] | None,
        typer.Option("--validation-prompt", help="Prompt to render during training; repeat for several."),
    ] = None,
    validate_every: Annotated[int | None, typer.Option(help="Render the validation prompts every N steps.")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile", help="torch.compile the UNet (GPUs; compiling takes minutes first).")
    ] = None,
    tf32: Annotated[bool | None, typer.Option("--tf32", help="TF32 matmuls and convolutions (NVIDIA GPUs).")] = None,
    channels_last: Annotated[
        bool | None, typer.Option("--channels-last", help="NHWC memory format for the UNet.")
    ] = None,
    fused_adamw: Annotated[bool | None, typer.Option("--fused-adamw", help="The fused AdamW kernel.")] = None,
    lora_rank: Annotated[
        int | None, typer.Option(help="Train rank-R LoRA adapters instead of every weight (default: full).")
    ] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA scale alpha / rank; default: the rank.")] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="Dropout on the LoRA adapters' input.")] = None,
    lora_targets: Annotated[
        list[str] | None,
        typer.Option("--lora-target", help="UNet module (name or name suffix) to adapt; repeat for several."),
    ] = None,
    text_lora_rank: Annotated[
        int | None, typer.Option(help="With --learnable-text: the text encoder's LoRA rank; default: --lora-rank.")
    ] = None,
    deid_markers: Annotated[
        DeidMarkers | None,
        typer.Option(help='MIMIC\'s "___" de-identification markers in the training text: keep (paper) or strip.'),
    ] = None,
    allow_world_change: Annotated[
        bool | None,
        typer.Option("--allow-world-change", help="Resume a checkpoint of another process count (default: refused)."),
    ] = None,
    report_to: Annotated[
        str | None,
        typer.Option(help="auto (default: tensorboard if installed) | tensorboard | wandb (offline) | none."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Fine-tune the UNet (and, with --learnable-text, the text encoder) on prepared latents; with --lora-rank,
    LoRA adapters of them."""
    options = dict(locals())  # the flags, before the imports below add names
    from cxrdiff.finetune import FinetuneConfig
    from cxrdiff.finetune import finetune as step

    run_step(step, FinetuneConfig, options)


@app.command()
def sample(
    model: Annotated[Path | None, typer.Option(help="Model folder (finetune output or base model).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (re-run to complete).")] = None,
    prompts: Annotated[Path | None, typer.Option(help="test.parquet from `cxrdiff prepare`.")] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="Text file, one prompt per line.")] = None,
    prompt: Annotated[str | None, typer.Option(help="A single prompt.")] = None,
    n_per_prompt: Annotated[int | None, typer.Option(help="Images per prompt (4 for MS-SSIM diversity).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale.")] = None,
    scheduler: Annotated[Scheduler | None, typer.Option(help="Sampler (pndm: PLMS, the paper's).")] = None,
    seed: Annotated[int | None, typer.Option(help="Base seed; each image's seed derives from it.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N prompts (default: all).")] = None,
    prompt_column: Annotated[str | None, typer.Option(help="Column of --prompts holding the text.")] = None,
    mixed_precision: Annotated[SamplePrecision | None, typer.Option(help="auto: bf16 on CUDA, fp32 on CPU.")] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile", help="torch.compile the UNet (GPUs; compiling takes minutes first).")
    ] = None,
    tf32: Annotated[bool | None, typer.Option("--tf32", help="TF32 matmuls and convolutions (NVIDIA GPUs).")] = None,
    channels_last: Annotated[
        bool | None, typer.Option("--channels-last", help="NHWC memory format for the UNet.")
    ] = None,
    shard: ShardOpt = None,
    finalize: FinalizeOpt = None,
    dist_timeout: DistTimeoutOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Generate images with classifier-free guidance, reproducible per prompt."""
    options = dict(locals())  # the flags, before the imports below add names
    from cxrdiff.sample import SampleConfig
    from cxrdiff.sample import sample as step

    run_step(step, SampleConfig, options)


@app.command()
def ground(
    model: Annotated[Path | None, typer.Option(help="Model folder.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder.")] = None,
    data: Annotated[Path | None, typer.Option(help="ms_cxr.parquet from `cxrdiff prepare`.")] = None,
    image: Annotated[Path | None, typer.Option(help="A single image (PNG/JPG, or DICOM).")] = None,
    prompt: Annotated[str | None, typer.Option(help="The phrase for --image.")] = None,
    word: Annotated[list[str] | None, typer.Option(help="Word(s) to ground; repeat for several.")] = None,
    steps: Annotated[int | None, typer.Option(help="DDIM steps.")] = None,
    window: Annotated[int | None, typer.Option(help="Average the last N steps.")] = None,
    mode: Annotated[GroundMode | None, typer.Option(help="noise (paper) or invert (DDIM inversion).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale (1 = conditional only).")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    noise_seeds: Annotated[
        int | None, typer.Option(help="Repeat the grounding with this many noise seeds; mean ± std over them.")
    ] = None,
    cnr: Annotated[CnrKind | None, typer.Option(help="signed (paper) or abs (BioViL).")] = None,
    boxes: Annotated[
        BoxMode | None, typer.Option(help="union (an image's boxes of the class, paper), per-box, or per-phrase.")
    ] = None,
    frame: Annotated[Frame | None, typer.Option(help="prepared (paper, 512 crop) or the original image frame.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N samples (default: all).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per UNet batch.")] = None,
    min_word_count: Annotated[
        int | None, typer.Option(help="Word analysis: words in more than N phrases of a class (paper: 25).")
    ] = None,
    latent: Annotated[
        LatentSampling | None, typer.Option(help="sample (a seeded posterior draw, paper) or mean.")
    ] = None,
    allow_scaling_mismatch: Annotated[
        bool | None,
        typer.Option("--allow-scaling-mismatch", help="Ground latents prepared with another VAE scaling factor."),
    ] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile", help="torch.compile the UNet (GPUs; compiling takes minutes first).")
    ] = None,
    tf32: Annotated[bool | None, typer.Option("--tf32", help="TF32 matmuls and convolutions (NVIDIA GPUs).")] = None,
    channels_last: Annotated[
        bool | None, typer.Option("--channels-last", help="NHWC memory format for the UNet.")
    ] = None,
    shard: ShardOpt = None,
    finalize: FinalizeOpt = None,
    dist_timeout: DistTimeoutOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Ground words of a phrase in an image from the UNet's cross-attention; score against boxes."""
    options = dict(locals())  # the flags, before the imports below add names
    from cxrdiff.ground import GroundConfig
    from cxrdiff.ground import ground as step

    run_step(step, GroundConfig, options)


@app.command()
def report(
    runs: Annotated[list[Path] | None, typer.Argument(help="Run folders (finetune outputs or base models).")] = None,
    out: Annotated[Path | None, typer.Option(help="Report folder.")] = None,
    real: Annotated[Path | None, typer.Option(help="Prepared folder with the real p19 test images.")] = None,
    inception_weights: Annotated[Path | None, typer.Option(help="InceptionV3 FID weights file.")] = None,
    xrv_weights: Annotated[Path | None, typer.Option(help="torchxrayvision densenet121-res224-all file.")] = None,
    n_fid: Annotated[int | None, typer.Option(help="Images per side for FID.")] = None,
    diversity_prompts: Annotated[int | None, typer.Option(help="Prompts × 4 images for MS-SSIM.")] = None,
    random_features: Annotated[
        bool | None, typer.Option("--random-features", help="Allow untrained feature nets (labelled, not FID).")
    ] = None,
    classifier_positives: Annotated[
        ClassifierPositives | None,
        typer.Option(help="only: images whose only label is d (paper); any: every image labelled d."),
    ] = None,
    classifier_prompts_per_class: Annotated[
        int | None,
        typer.Option(help="Classifier check on its own set: K prompts per class and K No Finding (default: p19)."),
    ] = None,
    min_word_count: Annotated[
        int | None, typer.Option(help="Word analysis: words in more than N phrases of a class (paper: 25).")
    ] = None,
    checkpoints: Annotated[
        bool | None, typer.Option("--checkpoints", help="Also measure each run's kept checkpoints (curves).")
    ] = None,
    table4_p19_only: Annotated[
        bool | None,
        typer.Option("--table4-p19-only", help="Fidelity from the p19 prompts only (no MS-CXR phrase samples)."),
    ] = None,
    other_sources: Annotated[
        OtherSources | None,
        typer.Option(help="Runs trained on labels / file: texts: grounding (Table 7 only, paper) or full."),
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="With --checkpoints: every Nth kept checkpoint, the newest always in.")
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(help="NAME=DIR: name the group of runs trained like DIR (repeatable; groups: all but the seed)."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Runs measured side by side on a multi-core CPU (one process each).")
    ] = None,
    features: Annotated[
        list[str] | None,
        typer.Option(
            help="Feature network for FD, KID, precision/recall/density/coverage: inception, xrv, classifier, hf:DIR "
            "or hf:NAME=DIR (a local Hugging Face model, e.g. RadDino; CLS token). Repeatable; default: the FDs' own."
        ),
    ] = None,
    min_class_images: Annotated[
        int | None, typer.Option(help="Per-class metrics where real and generated images each number this many.")
    ] = None,
    kid_subsets: Annotated[int | None, typer.Option(help="KID: random subsets averaged.")] = None,
    kid_subset_size: Annotated[int | None, typer.Option(help="KID: images per subset (clipped to the sets).")] = None,
    prdc_k: Annotated[int | None, typer.Option(help="Precision/recall/density/coverage neighbourhood k.")] = None,
    no_privacy: Annotated[
        bool | None, typer.Option("--no-privacy", help="Skip the privacy section (nearest training images).")
    ] = None,
    privacy_features: Annotated[
        str | None, typer.Option(help="Network of the nearest-training search (a --features value; default: first).")
    ] = None,
    privacy_max_train: Annotated[
        int | None, typer.Option(help="Search a seeded sample of N training images (default: all).")
    ] = None,
    privacy_quantile: Annotated[
        float | None, typer.Option(help="Copy threshold: this quantile of held-out test images' similarities.")
    ] = None,
    privacy_pixels: Annotated[int | None, typer.Option(help="Pixel correlation at this image size.")] = None,
    privacy_pairs: Annotated[int | None, typer.Option(help="Closest pairs shown per run and measure.")] = None,
    memorization_prompts: Annotated[
        int | None, typer.Option(help="Memorization score: training prompts (and as many held-out; 0: off).")
    ] = None,
    memorization_noise: Annotated[int | None, typer.Option(help="Memorization score: noise draws per prompt.")] = None,
    memorization_steps: Annotated[int | None, typer.Option(help="Memorization score: DDIM steps averaged.")] = None,
    emit_jobs: Annotated[
        Path | None,
        typer.Option(help="Write the sample/ground command of every sub-folder here (one a line) and run nothing."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Measure both sides of the trade-off and write report.md / report.html / metrics.json."""
    options = dict(locals())  # the flags, before the imports below add names
    from cxrdiff.report import ReportConfig
    from cxrdiff.report import report as step

    run_step(step, ReportConfig, options)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for every artifact of the demo.")] = Path("cxrdiff-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A smaller run (about 2 minutes on 2 CPU cores).")] = False,
    text_init: Annotated[
        TextInit,
        typer.Option(help="The tiny text encoder: contrastively pretrained, token-local by construction, or both."),
    ] = TextInit.pretrained,
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
    if coco:
        _demo_coco(out, quick)
        return
    from cxrdiff.demo import demo as run_demo

    encoders = tuple(e.strip() for e in text_encoders.split(",") if e.strip())
    print_result(
        run_demo(
            out=out, quick=quick, text_init=text_init.value, trainings=trainings, text_encoders=encoders, lora=lora
        )
    )


def _demo_coco(out: Path, quick: bool) -> None:
    """`demo --coco`: its own chain and folder (cxrdiff.demo_coco); the default demo is untouched."""
    from cxrdiff.demo_coco import demo_coco

    print_result(demo_coco(out=Path("cxrdiff-demo-coco") if out == Path("cxrdiff-demo") else out, quick=quick))


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
        PredictionType, typer.Option(help="epsilon (SD2-base) or v_prediction (SD2-768).")
    ] = PredictionType.epsilon,
    seed: Annotated[int, typer.Option(help="Weight initialisation seed.")] = 0,
    text_encoder: Annotated[
        Path | None, typer.Option(help="A `model pretrain-text` folder: its text encoder instead of a random one.")
    ] = None,
) -> None:
    """Write a tiny, randomly initialised SD2-shaped model (real CLIP vocabulary) for tests and the demo."""
    from cxrdiff.models import write_tiny_model_cli

    print_result(
        write_tiny_model_cli(out, resolution, unet_channels, text_width, prediction_type.value, seed, text_encoder)
    )


@model_app.command("pretrain-text")
def model_pretrain_text(
    data: Annotated[
        Path, typer.Argument(help="MIMIC-CXR-shaped folder (metadata CSV, files/ with images and reports).")
    ],
    out: Annotated[Path, typer.Argument(help="New folder for text_encoder/ + tokenizer/.")],
    ms_cxr: Annotated[
        Path | None, typer.Option(help="MS-CXR box CSV: its images are left out (default: the one in DATA).")
    ] = None,
    text_fallback: Annotated[
        TextFallback | None, typer.Option(help="Text for reports without IMPRESSION (none: left out, as prepare).")
    ] = None,
    resolution: Annotated[int | None, typer.Option(help="Image size the image tower sees.")] = None,
    text_width: Annotated[int | None, typer.Option(help="Text encoder width.")] = None,
    text_layers: Annotated[int | None, typer.Option(help="Text encoder layers.")] = None,
    text_heads: Annotated[int | None, typer.Option(help="Text encoder attention heads.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Image–text pairs per batch.")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay.")] = None,
    held_out: Annotated[
        int | None, typer.Option(help="Pairs (whole patients) kept out for the retrieval check.")
    ] = None,
    max_pairs: Annotated[int | None, typer.Option(help="Use at most this many pairs (default: all).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Save a resumable state every N steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Initialisation, split and batch order.")] = None,
    config: ConfigOpt = None,
) -> None:
    """CLIP-style contrastive pretraining of a tiny text encoder (and a throw-away image tower) on image–report
    pairs; prints held-out retrieval accuracy beside chance."""
    options = dict(locals())
    from cxrdiff.pretrain_text import PretrainTextConfig, pretrain_text

    run_step(pretrain_text, PretrainTextConfig, options)


@model_app.command("pretrain-bert")
def model_pretrain_bert(
    data: Annotated[Path, typer.Argument(help="MIMIC-CXR-shaped folder (metadata CSV, files/ with reports).")],
    out: Annotated[Path, typer.Argument(help="New folder for the Hugging Face text model (and its tokenizer).")],
    ms_cxr: Annotated[
        Path | None, typer.Option(help="MS-CXR box CSV: its images' reports are left out (default: the one in DATA).")
    ] = None,
    text_fallback: Annotated[
        TextFallback | None, typer.Option(help="Text for reports without IMPRESSION (none: left out, as prepare).")
    ] = None,
    width: Annotated[int | None, typer.Option(help="Hidden size.")] = None,
    layers: Annotated[int | None, typer.Option(help="Transformer layers.")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads.")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="WordPiece vocabulary size (trained on the texts).")] = None,
    context_length: Annotated[int | None, typer.Option(help="Token positions (the encoder's context).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Texts per batch.")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay.")] = None,
    mask_probability: Annotated[float | None, typer.Option(help="Share of word tokens masked (BERT: 0.15).")] = None,
    held_out: Annotated[int | None, typer.Option(help="Texts (whole patients) kept out for the check.")] = None,
    max_pairs: Annotated[int | None, typer.Option(help="Use at most this many reports (default: all).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Save a resumable state every N steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Initialisation, split, batch order and masks.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Masked-language-model pretraining of a tiny BERT (WordPiece vocabulary trained too) on report texts, for
    `finetune --text-encoder`; prints held-out masked-token accuracy beside the most-frequent-token guess."""
    options = dict(locals())
    from cxrdiff.pretrain_bert import PretrainBertConfig, pretrain_bert

    run_step(pretrain_bert, PretrainBertConfig, options)


@model_app.command("random")
def model_random(
    out: Annotated[Path, typer.Argument(help="New folder for the diffusers pipeline.")],
    like: Annotated[PublishedModel, typer.Option(help="Published architecture and configs to copy.")],
    seed: Annotated[int, typer.Option(help="Weight initialisation seed.")] = 0,
    text_encoder_like: Annotated[
        PublishedTextEncoder | None,
        typer.Option(help="Condition on a random text encoder of this shape instead (with a linear width map)."),
    ] = None,
) -> None:
    """Write a released model's exact architecture and configs with seeded random weights (no download)."""
    from cxrdiff.models import write_random_model

    print_result(write_random_model(out, like.value, seed, text_encoder_like and text_encoder_like.value))


@model_app.command("info")
def model_info(path: Annotated[Path, typer.Argument(help="Model folder.")]) -> None:
    """Print a model folder's resolution, latent shape, prediction type and sizes."""
    from cxrdiff.models import describe

    print_result(describe(path))


@model_app.command("checkpoint")
def model_checkpoint(
    run: Annotated[Path, typer.Argument(help="A finished `finetune` folder.")],
    out: Annotated[Path, typer.Argument(help="New folder for the checkpoint's model.")],
    step: Annotated[int, typer.Option(help="The kept checkpoint's step (checkpoints/step-NNNNNNN).")],
) -> None:
    """Export a run's kept checkpoint as a model folder that `sample`, `ground` and `report` read."""
    from cxrdiff.finetune import export_checkpoint

    print_result(export_checkpoint(run, step, out))


def completion_script(shell: str) -> str:
    """The shell completion script for bash, zsh or fish (what `completions/` holds)."""
    # Typer's own generator (what `--show-completion` prints), called with an explicit shell
    # instead of detecting the one this process runs under.
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name="cxrdiff", complete_var="_CXRDIFF_COMPLETE", shell=shell)


def main() -> None:
    """Entry point: every expected failure is one line on stderr and an exit code; -v adds the traceback.

    Exit codes: 0 done; 75 try again (stopped by SIGTERM/SIGUSR1 at a clean point, or --out busy with another
    process: a scheduler requeues); 1 the run failed (RunError, or an unexpected error); 2 bad usage or input: an
    unknown option or a bad value (`error: MESSAGE (see cxrdiff CMD --help)`), an InputError, or a path the step
    cannot read or write (`error: PATH: reason`: no permission, a read-only or full disk, a file where a folder
    belongs); 130 Ctrl-C. In `finetune` the first Ctrl-C finishes the current step, saves its checkpoint and
    stops with a message (exit 130; SIGTERM/SIGUSR1 do the same with exit 75), and a second Ctrl-C aborts at
    once; elsewhere Ctrl-C stops at once. A stopped or killed step resumes when the same command is re-run.
    """
    from cxrdiff.console import verbosity

    try:
        code = app(prog_name="cxrdiff", standalone_mode=False)
    except CxrdiffError as exc:
        fail(str(exc), exc.exit_code)
    except OSError as exc:
        if exc.errno not in PATH_ERRNOS:
            fail(f"{type(exc).__name__}: {first_line(exc)} (run with -v for the traceback)", 1)
        fail(path_error(exc), 2)
    except (KeyboardInterrupt, typer.Abort) as exc:  # Ctrl-C (older Typer: an Abort from it) or end of input
        interrupted = isinstance(exc, KeyboardInterrupt) or isinstance(exc.__context__, KeyboardInterrupt)
        fail(INTERRUPTED, 130) if interrupted else fail("aborted", 1)
    except Exception as exc:
        if click_error(exc):
            usage_error(exc)
        if verbosity() > 0:
            raise
        fail(f"{type(exc).__name__}: {first_line(exc)} (run with -v for the traceback)", 1)
    if code == 130:  # Typer turns a KeyboardInterrupt outside a step's own handling into Exit(130)
        fail(INTERRUPTED, 130)
    sys.exit(code if isinstance(code, int) else 0)


INTERRUPTED = "interrupted (Ctrl-C); re-run the same command to resume where the step left off"


def click_error(exc: BaseException) -> bool:
    """Click's exception for bad usage (Typer raises its own copy of Click's), told by its class name so that
    neither's private modules are imported."""
    return any(kind.__name__ == "ClickException" for kind in type(exc).__mro__)


def usage_error(exc: Any) -> NoReturn:
    """A usage error in one line that names the command's help (Click and Typer print a box of 4–6 lines)."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # `cxrdiff` or `cxrdiff model` alone: the help, shown
        sys.exit(2)
    ctx = getattr(exc, "ctx", None)
    where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    fail(exc.format_message() + where, exc.exit_code, traceback_too=False)


PATH_ERRNOS = {
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
    errno.ENOENT, errno.ENAMETOOLONG, errno.ELOOP,
}  # fmt: skip


def path_error(exc: OSError) -> str:
    """`PATH: reason` of an operating-system error on a path (the reason in words, e.g. "Read-only file system")."""
    where = " → ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    reason = exc.strerror or first_line(exc)
    return f"{where}: {reason}" if where else reason


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fail(message: str, code: int, traceback_too: bool = True) -> NoReturn:
    """Print `error: MESSAGE` (after the traceback with -v) and exit with `code`."""
    from cxrdiff.console import verbosity

    if traceback_too and verbosity() > 0 and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    from cxrdiff.stopping import record_exit_code

    record_exit_code(code)
    sys.exit(code)
