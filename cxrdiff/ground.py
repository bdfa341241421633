"""`cxrdiff ground`: where does the model look when it reads "cardiomegaly"? Phrase grounding from the
UNet's cross-attention, scored against MS-CXR boxes (or COCO instance masks) with the paper's localization metrics.

The paper's procedure (docs/method.md, "Grounding"): a real image's latent is freshly noised to
every timestep of a DDIM schedule (new noise each step) and the UNet reads it with the phrase; the
cross-attention maps of the last `window` steps are averaged (`cxrdiff.attention`). `--mode invert`
instead inverts the latent with DDIM and captures during the reverse pass. The maps of the chosen
tokens are min-max normalised, resized bilinearly to the image frame and scored against the boxes.

Steps: check inputs → load samples → load the model → per run and batch: encode text, capture,
score, save a part file (resume point) → rank 0 merges parts into the outputs → manifest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np

from cxrdiff.artifacts import MANIFEST, StepFolder, atomic_path, input_identity, read_manifest, write_json
from cxrdiff.choices import BoxMode, CnrKind, Frame, GroundMode, LatentSampling, SamplePrecision
from cxrdiff.config import Range, check_ranges, settings, to_dict
from cxrdiff.console import log, progress
from cxrdiff.errors import InputError, RunError
from cxrdiff.speed import limit_cpu_threads, set_tf32, speed_up_unet

STEP = "ground"
DATA_COLUMNS = (
    "dicom_id",
    "category_name",
    "label_text",
    "boxes",
    "boxes_original",
    "image_width",
    "image_height",
    "latent_mean",
    "latent_shape",
)
SPECIAL = ("<SOS>", "<EOS>")


@dataclasses.dataclass(frozen=True)
class GroundConfig:
    """Settings of `cxrdiff ground` (defaults follow the paper)."""

    # The batch size stays in the settings: the resume points (parts) are numbered by batch.
    NOT_SETTINGS: ClassVar[tuple[str, ...]] = (
        "out", "overlays", "model", "data", "image", "allow_scaling_mismatch", "compile", "tf32", "channels_last",
    )  # fmt: skip

    model: Path | None = None
    out: Path | None = None
    data: Path | None = None  # ms_cxr.parquet from `cxrdiff prepare`
    image: Path | None = None  # single-image mode, with `prompt`
    prompt: str | None = None
    word: tuple[str, ...] | None = None
    steps: Annotated[int, Range(ge=1)] = 50
    window: Annotated[int, Range(ge=1)] = 40
    mode: GroundMode = "noise"
    guidance: Annotated[float, Range(ge=1.0)] = 1.0
    seed: Annotated[int, Range(ge=0)] = 0
    noise_seeds: Annotated[int, Range(ge=1)] = 1  # the grounding repeated with seeds seed..seed+N-1; mean ± std
    cnr: CnrKind = "signed"
    boxes: BoxMode = "union"  # union: all boxes of the image and class; per-phrase: the phrase's; per-box: each
    frame: Frame = "prepared"
    latent: LatentSampling = "sample"  # sample: a posterior draw per sample and run (the reference code's)
    limit: Annotated[int | None, Range(ge=1)] = None
    batch_size: Annotated[int, Range(ge=1)] = 8
    # Table 6: words occurring more than this many times in a class's phrases
    min_word_count: Annotated[int, Range(ge=0)] = 25
    overlays: bool = True
    precision: SamplePrecision = "auto"  # as sample's: auto = bf16 on CUDA, fp32 (no) on CPU
    compile: bool = False  # speed levers (cxrdiff.speed): torch.compile the UNet,
    tf32: bool = False  # TF32 matmuls (NVIDIA GPUs),
    channels_last: bool = False  # NHWC UNet
    allow_scaling_mismatch: bool = False  # ground latents prepared with another VAE scaling factor anyway


@dataclasses.dataclass
class GroundingInput:
    """One image + phrase (+ boxes for one category) to ground."""

    sample: str
    phrase: str
    latent: np.ndarray | None  # (C, H, W), unscaled VAE mean
    logvar: np.ndarray | None = None  # (C, H, W), the posterior's log-variance (for `--latent sample`)
    dicom_id: str = ""
    category: str = ""
    boxes: list[list[float]] = dataclasses.field(default_factory=list)  # prepared frame, (x, y, w, h)
    boxes_original: list[list[float]] = dataclasses.field(default_factory=list)
    width: int = 0
    height: int = 0
    image_path: str = ""
    mask: np.ndarray | None = None  # COCO: the category's mask in the prepared frame (then `boxes` are unused)
    word: str = ""  # COCO: the caption's word that names the category (its tokens are the map)


# --- inputs -----------------------------------------------------------------------------------


def check_inputs(config: GroundConfig) -> None:
    """Every usage error, before any weight is read."""
    from cxrdiff.models import check_model_folder

    if config.model is None:
        raise InputError("--model: required (a diffusers Stable Diffusion folder)")
    if config.out is None:
        raise InputError("--out: required (the folder to write heatmaps and scores to)")
    if (config.data is None) == (config.image is None):
        raise InputError("give exactly one of --data (ms_cxr.parquet) or --image (with --prompt)")
    if config.image is not None and not config.prompt:
        raise InputError(f"--image {config.image}: --prompt is required with --image")
    if config.data is not None and config.prompt:
        raise InputError("--prompt: only with --image (the phrases come from --data)")
    check_ranges(config)
    if config.window > config.steps:
        raise InputError(f"--window {config.window}: must be between 1 and --steps ({config.steps})")
    if config.image is not None and (config.frame != "prepared" or config.boxes != "union"):
        raise InputError("--frame/--boxes: only with --data (a single image has no boxes)")
    check_model_folder(config.model)
    _check_scaling_factor(config)
    StepFolder.claim(config.out, STEP, ground_settings(config), create=False)  # the kind of folder, early


def _check_scaling_factor(config: GroundConfig) -> None:
    """Latents prepared with another scaling factor than the model's VAE has came from another VAE (or its
    config was changed): grounding them would feed the UNet latents of the wrong scale, so they are refused
    before any weight is read, unless `--allow-scaling-mismatch` (then the recorded factor is used)."""
    if config.data is None or not Path(config.data).is_file():
        return  # single-image mode encodes with the model's own VAE; a missing file is load_samples' error
    recorded = data_manifest(Path(config.data)).get("scaling_factor")
    vae_config = Path(config.model) / "vae" / "config.json"
    try:
        model_factor = float(json.loads(vae_config.read_text()).get("scaling_factor", 0.18215))
    except (OSError, ValueError) as exc:
        raise InputError(f"{vae_config}: unreadable ({exc})") from None
    if recorded is None or math.isclose(float(recorded), model_factor) or config.allow_scaling_mismatch:
        return
    raise InputError(
        f"--data {config.data}: latents prepared with VAE scaling factor {recorded}, but --model {config.model} "
        f"has {model_factor}; prepare again with this model's VAE, or pass --allow-scaling-mismatch"
    )


def data_manifest(data: Path) -> dict[str, Any]:
    """The manifest of the prepare folder that holds `--data` (which is named when it is not in one)."""
    folder = data.absolute().parent
    if not (folder / MANIFEST).is_file():
        raise InputError(
            f"--data {data}: not in a `cxrdiff prepare` output folder (no {MANIFEST} beside it); "
            "give the ms_cxr.parquet of a prepared folder"
        )
    return read_manifest(folder, "prepare")


def load_samples(config: GroundConfig) -> list[GroundingInput]:
    """The samples to ground: rows of ms_cxr.parquet (checked) or the single image."""
    if config.image is not None:
        from cxrdiff.images import load_grayscale

        load_grayscale(config.image)  # unreadable → InputError now, not after loading weights
        return [GroundingInput(sample="000000", phrase=str(config.prompt), latent=None, image_path=str(config.image))]
    import pyarrow.parquet as pq

    path = Path(config.data)
    if not path.is_file():
        raise InputError(f"--data {path}: file not found (give ms_cxr.parquet from `cxrdiff prepare`)")
    data_manifest(path)
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise InputError(f"--data {path}: not a readable Parquet file ({str(exc).strip().splitlines()[0]})") from None
    if "mask_rle" in table.column_names:
        return _coco_samples(table, config, path)
    wanted = (*DATA_COLUMNS, "latent_logvar") if config.latent == "sample" else DATA_COLUMNS
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise InputError(f"--data {path}: missing column(s) {', '.join(missing)}; expected an ms_cxr.parquet")
    rows = table.to_pylist()[: config.limit]
    if not rows:
        raise InputError(f"--data {path}: no rows")
    from cxrdiff.data import latent_from_bytes

    samples = []
    shapes = set()
    for i, row in enumerate(rows):
        shape = tuple(int(s) for s in row["latent_shape"])
        shapes.add(shape)
        samples.append(
            GroundingInput(
                sample=f"{i:06d}",
                phrase=str(row["label_text"]),
                latent=latent_from_bytes(row["latent_mean"], shape),
                logvar=latent_from_bytes(row["latent_logvar"], shape) if config.latent == "sample" else None,
                dicom_id=str(row["dicom_id"]),
                category=str(row["category_name"]),
                boxes=[list(map(float, b)) for b in row["boxes"] or []],
                boxes_original=[list(map(float, b)) for b in row["boxes_original"] or []],
                width=int(row["image_width"]),
                height=int(row["image_height"]),
                image_path=str(row.get("image_path") or ""),
            )
        )
    if len(shapes) != 1:
        raise InputError(f"--data {path}: rows have different latent shapes {sorted(shapes)}")
    return _union_boxes(samples) if config.boxes == "union" else samples


COCO_COLUMNS = ("image_id", "category_name", "caption", "word", "mask_rle", "latent_mean", "latent_shape")


def _coco_samples(table: Any, config: GroundConfig, path: Path) -> list[GroundingInput]:
    """Rows of a `prepare --format coco` coco_test.parquet: the caption, its matched word and the category's
    mask (COCO RLE, prepared frame). Masks exist only in the prepared frame and are one region per row."""
    from cxrdiff.coco import decode_rle
    from cxrdiff.data import latent_from_bytes

    if config.frame != "prepared":
        raise InputError(f"--frame {config.frame}: --data {path} holds COCO masks, stored in the prepared frame only")
    if config.boxes == "per-box":
        raise InputError(f"--boxes per-box: --data {path} holds one mask per image and category, not boxes")
    wanted = (*COCO_COLUMNS, "latent_logvar") if config.latent == "sample" else COCO_COLUMNS
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise InputError(f"--data {path}: missing column(s) {', '.join(missing)}; expected a coco_test.parquet")
    rows = table.to_pylist()[: config.limit]
    if not rows:
        raise InputError(f"--data {path}: no rows")
    samples = []
    for i, row in enumerate(rows):
        shape = tuple(int(v) for v in row["latent_shape"])
        samples.append(
            GroundingInput(
                sample=f"{i:06d}",
                phrase=str(row["caption"]),
                latent=latent_from_bytes(row["latent_mean"], shape),
                logvar=latent_from_bytes(row["latent_logvar"], shape) if config.latent == "sample" else None,
                dicom_id=str(row["image_id"]),
                category=str(row["category_name"]),
                width=int(row.get("image_width") or 0),
                height=int(row.get("image_height") or 0),
                image_path=str(row.get("image_path") or ""),
                mask=decode_rle(row["mask_rle"]),
                word=str(row["word"]),
            )
        )
    if len({s.latent.shape for s in samples}) != 1:
        raise InputError(f"--data {path}: rows have different latent shapes")
    return samples


def _union_boxes(samples: list[GroundingInput]) -> list[GroundingInput]:
    """`--boxes union`: every phrase of an image and class is scored against all of that pair's boxes (the
    paper's segmentation protocol), not only its own phrase's (`per-phrase`, the phrase-grounding one)."""
    boxes: dict[tuple[str, str], list[list[float]]] = {}
    original: dict[tuple[str, str], list[list[float]]] = {}
    for s in samples:
        key = (s.dicom_id, s.category)
        for found, own in ((boxes.setdefault(key, []), s.boxes), (original.setdefault(key, []), s.boxes_original)):
            found += [b for b in own if b not in found]  # a box two phrases share counts once
    return [
        dataclasses.replace(s, boxes=boxes[(s.dicom_id, s.category)], boxes_original=original[(s.dicom_id, s.category)])
        for s in samples
    ]


# --- tokens -----------------------------------------------------------------------------------


def choose_tokens(tokenizer: Any, sample: GroundingInput, words: tuple[str, ...] | None) -> tuple[list[int], str]:
    """Token positions whose maps are averaged, and where they came from ("word", "class" or "all").

    With `words`, every occurrence of each; otherwise a COCO row's matched word (its first occurrence), or
    the category's words matched by substring (the paper's rule); with no match, every word token of the
    phrase (no start, end or padding).
    """
    from cxrdiff.data import CLASS_WORDS
    from cxrdiff.tokens import content_positions, prompt_words, text_limit, word_token_spans

    limit = text_limit(tokenizer)
    if words:
        positions = sorted(
            {
                p
                for w in words
                for span in word_token_spans(tokenizer, sample.phrase, w, missing="empty", truncation="drop")
                for p in span
            }
        )
        if positions:
            return positions, "word"
    elif sample.word:  # COCO: the word of the caption that names the category
        spans = word_token_spans(tokenizer, sample.phrase, sample.word, missing="empty", truncation="drop")
        if spans:
            return spans[0], "word"
    elif sample.category in CLASS_WORDS:
        keys = CLASS_WORDS[sample.category]
        positions = sorted(
            {
                p
                for w in prompt_words(tokenizer, sample.phrase)
                if any(k in w.bare for k in keys)
                for p in w.positions
                if p < limit
            }
        )
        if positions:
            return positions, "class"
    positions = content_positions(tokenizer, sample.phrase)
    if not positions:
        raise InputError(f"phrase {sample.phrase!r} (sample {sample.sample}) has no word tokens to ground")
    return positions, "all"


def word_positions(tokenizer: Any, phrase: str) -> dict[str, int]:
    """Table 6 candidates: each distinct word as written (case kept, edge punctuation removed) at its first
    token, plus the start and end tokens (CLIP's start/end of text, BERT's [CLS] and [SEP]). "Small" and
    "small" are two words, as in the paper's table."""
    from cxrdiff.tokens import prompt_token_count, prompt_words, special_counts, text_limit

    leading, trailing = special_counts(tokenizer)
    limit = text_limit(tokenizer)
    found = {SPECIAL[0]: 0} if leading else {}
    for w in prompt_words(tokenizer, phrase):
        written = _AS_WRITTEN.match(w.text).group(1) or w.text  # type: ignore[union-attr]
        if written not in found and w.start < min(w.stop, limit):
            found[written] = w.start
    if trailing:
        found[SPECIAL[1]] = min(leading + prompt_token_count(tokenizer, phrase), limit)
    return found


_AS_WRITTEN = re.compile(r"^[^0-9A-Za-z]*(.*?)[^0-9A-Za-z]*$", re.DOTALL)


# --- maps -------------------------------------------------------------------------------------


def _sample_seed(seed: int, sample: str) -> int:
    return int(np.random.SeedSequence([seed, int(sample)]).generate_state(1)[0])


def grounded_latent(sample: GroundingInput, config: GroundConfig, run: int) -> np.ndarray:
    """The unscaled latent a run grounds: the posterior mean, or (`--latent sample`, the reference code's
    choice) a draw mean + exp(logvar / 2) · ε with ε seeded by (seed + run, sample), apart from the noise."""
    if config.latent == "mean" or sample.logvar is None:
        return sample.latent
    rng = np.random.default_rng(np.random.SeedSequence([config.seed + run, int(sample.sample), 1]))
    eps = rng.standard_normal(sample.latent.shape, dtype=np.float32)  # (C, H, W)
    return (sample.latent + np.exp(0.5 * sample.logvar.astype(np.float32)) * eps).astype(np.float32)


def encode_text(comps: Any, prompts: list[str], device: Any) -> Any:
    """The UNet's context for `prompts` (batch, tokens, dim): the model's text encoder as it was trained
    (`text_encoders.encode`: SD's CLIP as diffusers, or the run's own encoder and projection)."""
    from cxrdiff.text_encoders import encode

    return encode(comps.text, prompts, device)


def capture_maps(comps: Any, latents: Any, context: Any, config: GroundConfig, seeds: list[int], uncond: Any = None):
    """Average cross-attention maps (batch, tokens, H, W) of one batch of scaled latents (batch, C, H, W)."""
    import torch
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    from cxrdiff.attention import AttentionCapture

    unet = comps.unet
    cfg = config.guidance > 1.0
    scheduler = DDIMScheduler.from_config(comps.scheduler.config)
    scheduler.set_timesteps(config.steps, device=latents.device)
    emb = torch.cat([uncond.expand_as(context), context]) if cfg else context  # (batch×(1|2), tokens, dim)
    first = config.steps - config.window
    with torch.no_grad(), AttentionCapture(unet, latents.shape[-2:], drop_uncond=cfg) as capture:
        if config.mode == "noise":
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            for i, t in enumerate(scheduler.timesteps):
                noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens])  # (batch, C, H, W)
                if i < first:  # the UNet's output is never used: steps before the window change nothing
                    continue
                capture.active = True
                noisy = scheduler.add_noise(latents, noise.to(latents), t)  # (batch, C, H, W)
                unet(torch.cat([noisy, noisy]) if cfg else noisy, t, encoder_hidden_states=emb)
        else:
            inverse = DDIMInverseScheduler.from_config(comps.scheduler.config)
            inverse.set_timesteps(config.steps, device=latents.device)
            x = latents
            for t in inverse.timesteps:  # conditional DDIM inversion, capture off
                eps = unet(x, t, encoder_hidden_states=context).sample  # (batch, C, H, W)
                x = inverse.step(eps, t, x).prev_sample
            for i, t in enumerate(scheduler.timesteps):
                capture.active = i >= first
                out = unet(torch.cat([x, x]) if cfg else x, t, encoder_hidden_states=emb).sample
                if cfg:
                    out_u, out_c = out.chunk(2)
                    out = out_u + config.guidance * (out_c - out_u)
                x = scheduler.step(out, t, x).prev_sample
        return capture.maps()  # (batch, tokens, H, W)


def normalise(heat: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes zeros."""
    low, high = float(heat.min()), float(heat.max())
    return (heat - low) / (high - low) if high > low else np.zeros_like(heat)


def to_frame(heat: np.ndarray, size: int) -> np.ndarray:
    """A latent-grid map (h, w) → bilinear to the square prepared frame (size, size)."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None, None]  # (1, 1, h, w)
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def to_original(frame_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """A prepared-frame map → the original image (height, width), undoing the resize + centre crop.

    Pixels the crop cut away were never seen by the model: they get 0, the normalised minimum.
    """
    import torch
    import torch.nn.functional as F

    from cxrdiff.images import crop_geometry

    size = frame_map.shape[0]
    scale, left, top = crop_geometry(width, height, size)
    u = (torch.arange(width, dtype=torch.float64) + 0.5) * scale - left  # prepared-frame x of each column
    v = (torch.arange(height, dtype=torch.float64) + 0.5) * scale - top
    grid = torch.stack(torch.meshgrid(2 * v / size - 1, 2 * u / size - 1, indexing="ij")[::-1], dim=-1)  # (H, W, 2)
    tensor = torch.from_numpy(np.ascontiguousarray(frame_map, dtype=np.float32))[None, None]  # (1, 1, size, size)
    out = F.grid_sample(tensor, grid[None].float(), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0, 0].numpy()  # (height, width)


def scoring_maps(sample: GroundingInput, heat: np.ndarray, frame_size: int, frame: str) -> np.ndarray:
    """Normalised latent map → the frame it is scored in."""
    frame_map = to_frame(normalise(heat), frame_size)
    return frame_map if frame == "prepared" else to_original(frame_map, sample.width, sample.height)


def masks(sample: GroundingInput, frame_size: int, config: GroundConfig) -> list[tuple[int | None, np.ndarray]]:
    """(box index or None for the union, boolean mask) in the scoring frame."""
    from cxrdiff.images import boxes_mask

    if sample.mask is not None:  # COCO: the category's instance mask, already in the prepared frame
        if sample.mask.shape != (frame_size, frame_size):
            raise InputError(f"sample {sample.sample}: mask {sample.mask.shape} is not the {frame_size} px frame")
        return [(None, sample.mask)]
    boxes = sample.boxes if config.frame == "prepared" else sample.boxes_original
    size = frame_size if config.frame == "prepared" else (sample.height, sample.width)
    if config.boxes in ("union", "per-phrase"):  # the sample's boxes: see `_union_boxes`
        return [(None, boxes_mask(boxes, size))]
    return [(i, boxes_mask([b], size)) for i, b in enumerate(boxes)]


def score(heat: np.ndarray, mask: np.ndarray, config: GroundConfig) -> dict[str, float] | str:
    """The three metrics, or the reason the mask cannot be scored."""
    from cxrdiff.metrics.localization import auc_roc, cnr, top1

    if not mask.any():
        return "box outside the frame (empty mask)"
    if mask.all():
        return "box covers the whole frame"
    return {
        "auc_roc": auc_roc(heat, mask),
        "top1": top1(heat, mask),
        "cnr": cnr(heat, mask, absolute=config.cnr == "abs"),
    }


# --- overlays ---------------------------------------------------------------------------------


def overlay(grey: np.ndarray, heat: np.ndarray, boxes: list[list[float]], alpha: float = 0.45):
    """The paper's Figure 2: the image in grey, the normalised heatmap in colour over it, boxes in red."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    size = grey.shape[0]
    colour = colormaps["jet"](to_frame(normalise(heat), size))[..., :3] * 255.0  # (size, size, 3)
    base = np.repeat(grey[..., None].astype(np.float32), 3, axis=-1)  # (size, size, 3)
    image = Image.fromarray(np.round((1 - alpha) * base + alpha * colour).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for x, y, w, h in boxes:
        draw.rectangle([x, y, x + w, y + h], outline=(255, 0, 0), width=max(1, size // 256))
    return image


MIN_OVERLAY = 256  # pixels on the short side of a single image's overlay, at the least


def image_overlay(config: GroundConfig, heat: np.ndarray, frame_size: int, alpha: float = 0.45) -> bytes:
    """`--image`'s overlay as PNG bytes: the image at its own size (the map taken back through prepare's resize
    and crop; what the crop cut away shows 0), the phrase and the grounded words as its title, a colour bar.
    The model's frame (64 px for the demo's model) is too small to read; an image under `MIN_OVERLAY` pixels
    on its short side is enlarged by a whole factor, so each of its pixels stays a square."""
    import io

    from matplotlib.figure import Figure

    from cxrdiff.images import load_grayscale

    grey = load_grayscale(Path(str(config.image)))  # (H, W)
    height, width = grey.shape
    heat_map = to_original(to_frame(normalise(heat), frame_size), width, height)  # (H, W) in [0, 1]
    dpi, factor = 100, -(-MIN_OVERLAY // min(height, width))  # the factor: 1 for an image of MIN_OVERLAY px or more
    figure = Figure(figsize=(width * factor / dpi, height * factor / dpi), dpi=dpi)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))  # the image fills the figure: one pixel per pixel
    axes.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    shown = axes.imshow(heat_map, cmap="jet", vmin=0.0, vmax=1.0, alpha=alpha, interpolation="nearest")
    axes.set_axis_off()
    words = ", ".join(config.word) if config.word else "every word"
    axes.set_title(f"{config.prompt}\ncross-attention on: {words}", fontsize=10)
    bar = figure.colorbar(shown, cax=figure.add_axes((1.02, 0.0, 0.03, 1.0)))
    bar.set_label("attention, normalised", fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)  # the title and bar outside
    return buffer.getvalue()


def _grey_image(sample: GroundingInput, comps: Any, latent: Any, data_dir: Path | None, size: int) -> np.ndarray:
    """The image in the prepared frame: from its file when it can be found, else decoded from the latent."""
    import torch

    from cxrdiff.images import grey_from_vae, load_grayscale, resize_center_crop

    for candidate in (Path(sample.image_path), (data_dir or Path()) / sample.image_path):
        if sample.image_path and candidate.is_file():
            try:
                return resize_center_crop(load_grayscale(candidate), size)
            except InputError:
                break
    with torch.no_grad():
        decoded = comps.vae.decode(latent[None] / comps.scaling_factor).sample  # (1, 3, size, size)
    return grey_from_vae(decoded)[0]


# --- the run ----------------------------------------------------------------------------------


# The settings key keeps the names and values folders were made with before the fields were renamed
# (`runs` → `noise_seeds`; `dtype` float32 / bfloat16 / float16 → `precision` no / bf16 / fp16, as sample's).
KEY_PRECISION = {"auto": "auto", "no": "float32", "bf16": "bfloat16", "fp16": "float16"}


def ground_settings(config: GroundConfig) -> dict[str, Any]:
    """The settings key's content: the config, with the model, data and image by their identity."""
    given = {name: input_identity(getattr(config, name)) for name in ("data", "image") if getattr(config, name)}
    chosen = settings(config, model=input_identity(config.model), **given)
    chosen["runs"], chosen["dtype"] = chosen.pop("noise_seeds"), KEY_PRECISION[chosen.pop("precision")]
    return chosen


def _dtype(config: GroundConfig, device: Any) -> Any:
    import torch

    if config.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]


def ground(config: GroundConfig) -> dict[str, Any]:
    """Ground the phrases, score them, and write heatmaps, overlays, scores, summary and manifest."""
    import torch
    from accelerate import PartialState

    from cxrdiff.models import load_components

    check_inputs(config)
    out = Path(config.out)
    samples = load_samples(config)
    if config.word:
        from cxrdiff.text_encoders import load_tokenizer
        from cxrdiff.tokens import word_token_spans

        tokenizer = load_tokenizer(Path(config.model) / "tokenizer")
        for w in config.word:
            if config.image is not None:
                word_token_spans(tokenizer, samples[0].phrase, w)  # not in the prompt: an input error, before weights
            elif not any(word_token_spans(tokenizer, s.phrase, w, missing="empty", truncation="drop") for s in samples):
                # a typo would silently fall back to all word tokens in every sample
                raise InputError(f"--word {w!r}: occurs in none of the {len(samples)} phrases of --data {config.data}")
    state = PartialState()
    folder = StepFolder.claim(out, STEP, ground_settings(config), create=state.is_main_process)
    if folder.finished:
        log.info("%s: already complete; nothing to do", out)
        return _result(out, json.loads((out / "summary.json").read_text()))
    parts = out / ".parts"
    if state.is_main_process:
        parts.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()

    device = state.device
    limit_cpu_threads(device)
    set_tf32(config.tf32)
    dtype = _dtype(config, device)
    comps = load_components(config.model, device=device, dtype=None if dtype == torch.float32 else dtype)
    speed_up_unet(comps.unet, compile=config.compile, channels_last=config.channels_last)
    tokenizer = comps.tokenizer
    if config.image is not None:
        samples[0].latent, samples[0].logvar = _encode_image(comps, config.image, device, dtype)
    channels = samples[0].latent.shape[0]
    if channels != comps.unet.config.in_channels:
        raise InputError(
            f"--data {config.data}: latents have {channels} channels, the model's UNet takes "
            f"{comps.unet.config.in_channels}; prepare with this model's VAE"
        )
    frame_size = int(samples[0].latent.shape[-1]) * comps.vae_scale_factor
    scaling = _scaling_factor(config, comps)
    uncond = encode_text(comps, [""], device) if config.guidance > 1.0 else None
    data_dir = Path(config.data).parent if config.data is not None else None

    chunks = [samples[i : i + config.batch_size] for i in range(0, len(samples), config.batch_size)]
    todo = [
        (run, c)
        for run in range(config.noise_seeds)
        for c in range(len(chunks))
        if (run * len(chunks) + c) % state.num_processes == state.process_index
        and not (parts / f"r{run:03d}-c{c:05d}.json").is_file()
    ]
    for run, c in progress(todo, description="grounding"):
        chunk = chunks[c]
        unscaled = np.stack([grounded_latent(s, config, run) for s in chunk])  # (b, C, H, W)
        latents = torch.from_numpy(unscaled).to(device, dtype) * scaling  # (b, C, H, W)
        context = encode_text(comps, [s.phrase for s in chunk], device)  # (b, tokens, dim)
        seeds = [_sample_seed(config.seed + run, s.sample) for s in chunk]
        maps = capture_maps(comps, latents, context, config, seeds, uncond).float().cpu().numpy()  # (b, T, H, W)
        result = _score_chunk(chunk, maps, config, tokenizer, frame_size, run)
        if run == 0 and config.overlays and config.image is not None:  # one image: drawn at its own size
            with atomic_path(out / "overlays" / f"{chunk[0].sample}.png") as tmp:
                tmp.write_bytes(image_overlay(config, next(iter(result["heatmaps"].values())), frame_size))
        elif run == 0 and config.overlays:
            for s, heat, latent in zip(chunk, result["heatmaps"].values(), latents, strict=True):
                grey = _grey_image(s, comps, latent, data_dir, frame_size)
                with atomic_path(out / "overlays" / f"{s.sample}.png") as tmp:
                    overlay(grey, heat, s.boxes).save(tmp, format="PNG")
        _save_part(parts, run, c, result)
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    summary = _merge(folder, parts, config, len(chunks), samples, frame_size)
    return _result(out, summary)


def _encode_image(comps: Any, path: Path, device: Any, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Single-image mode: the image's posterior (unscaled mean and log-variance, as `prepare` stores them)."""
    import torch

    from cxrdiff.images import load_grayscale, resize_center_crop, to_model_input

    grey = resize_center_crop(load_grayscale(path), comps.resolution)
    with torch.no_grad():
        posterior = comps.vae.encode(to_model_input(grey).to(device, dtype)).latent_dist
    return posterior.mean[0].float().cpu().numpy(), posterior.logvar[0].float().cpu().numpy()  # (C, H, W) each


def _scaling_factor(config: GroundConfig, comps: Any) -> float:
    """The prepare manifest's scaling factor when it records one (it made the latents), else the model's."""
    if config.data is not None:
        recorded = data_manifest(Path(config.data)).get("scaling_factor")
        if recorded is not None:
            if not math.isclose(float(recorded), comps.scaling_factor):
                log.warning(
                    "latents were scaled by %s at prepare time; the model says %s", recorded, comps.scaling_factor
                )
            return float(recorded)
    return comps.scaling_factor


def _score_chunk(chunk, maps, config, tokenizer, frame_size, run) -> dict[str, Any]:
    """Heatmaps, score rows, word-analysis rows and skip notes for one batch."""
    heatmaps, rows, word_rows, skipped = {}, [], [], []
    for s, token_maps in zip(chunk, maps, strict=True):
        positions, source = choose_tokens(tokenizer, s, config.word)
        heat = token_maps[positions].mean(axis=0)  # (H, W)
        heatmaps[s.sample] = heat
        if config.image is not None:
            rows.append({"sample": s.sample, "phrase": s.phrase, "tokens": positions, "token_source": source})
            continue
        frame_map = scoring_maps(s, heat, frame_size, config.frame)
        base = {
            "run": run,
            "sample": s.sample,
            "dicom_id": s.dicom_id,
            "category": s.category,
            "phrase": s.phrase,
            "tokens": positions,
            "token_text": " ".join(tokenizer.convert_ids_to_tokens(_ids_at(tokenizer, s.phrase, positions))),
            "token_source": source,
        }
        union = None
        for box, mask in masks(s, frame_size, config):
            result = score(frame_map, mask, config)
            if isinstance(result, str):
                skipped.append({"run": run, "sample": s.sample, "box": box, "reason": result})
                continue
            rows.append({**base, "box": box, **result})
            union = mask if union is None else union | mask
        if union is None or union.all():
            continue
        for word, position in word_positions(tokenizer, s.phrase).items():
            word_map = scoring_maps(s, token_maps[position], frame_size, config.frame)
            value = score(word_map, union, config)
            word_rows.append(
                {"run": run, "sample": s.sample, "category": s.category, "word": word, "cnr": value["cnr"]}
            )
    return {"heatmaps": heatmaps, "rows": rows, "words": word_rows, "skipped": skipped}


def _ids_at(tokenizer: Any, phrase: str, positions: list[int]) -> list[int]:
    """The token ids at these positions of the phrase as the text encoder sees it (padded, truncated)."""
    ids = tokenizer(phrase, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    return [ids[p] for p in positions]


def _save_part(parts: Path, run: int, c: int, result: dict[str, Any]) -> None:
    """One batch's results: the npz first, the json last (its presence marks the batch done)."""
    name = f"r{run:03d}-c{c:05d}"
    with atomic_path(parts / f"{name}.npz") as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **result["heatmaps"])
    write_json(parts / f"{name}.json", {k: result[k] for k in ("rows", "words", "skipped")})


def _merge(folder, parts, config, n_chunks, samples, frame_size) -> dict[str, Any]:
    """Rank 0: the part files → heatmaps.npz, scores.parquet, words.parquet, summary.json, manifest."""
    import pandas as pd

    out = folder.out
    heatmaps, rows, words, skipped = {}, [], [], []
    for run in range(config.noise_seeds):
        for c in range(n_chunks):
            name = f"r{run:03d}-c{c:05d}"
            if not (parts / f"{name}.json").is_file():
                raise RunError(f"{parts / name}: a batch has no results; re-run the same command to finish it")
            part = json.loads((parts / f"{name}.json").read_text())
            rows += part["rows"]
            words += part["words"]
            skipped += part["skipped"]
            with np.load(parts / f"{name}.npz") as maps:
                heatmaps.update({f"{k}_r{run}" if config.noise_seeds > 1 else k: maps[k] for k in maps.files})
    with atomic_path(out / "heatmaps.npz") as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **heatmaps)
    files = ["heatmaps.npz"]
    summary: dict[str, Any] = {
        "samples": len(samples),
        "conventions": {
            "cnr": config.cnr,
            "boxes": config.boxes,
            "frame": config.frame,
            "frame_size": frame_size if config.frame == "prepared" else "original image size",
            "map": "softmax over tokens, mean over heads, nearest to the latent grid, mean over layers and the "
            f"last {config.window} of {config.steps} DDIM steps; min-max normalised, bilinear to the frame",
            "mode": config.mode,
            "guidance": config.guidance,
            "latent": "VAE posterior mean"
            if config.latent == "mean"
            else "a VAE posterior sample, seeded per sample and run",
            "boxes_rule": BOX_RULES[config.boxes],
            "seeds": [config.seed + r for r in range(config.noise_seeds)],
        },
        "skipped": skipped,
    }
    if config.image is not None:
        summary["tokens"] = rows[0]["tokens"]
        summary["token_source"] = rows[0]["token_source"]
        summary["phrase"] = rows[0]["phrase"]
    else:
        scores = pd.DataFrame(rows, columns=_SCORE_COLUMNS)
        _write_parquet(scores, out / "scores.parquet")
        files.append("scores.parquet")
        summary.update(_tables(scores, config.noise_seeds))
        word_table = pd.DataFrame(words, columns=["run", "sample", "category", "word", "cnr"])
        _write_parquet(word_table, out / "words.parquet")
        files.append("words.parquet")
        summary["word_analysis"] = word_analysis(word_table, config.min_word_count)
    if config.overlays:
        files += sorted(f"overlays/{p.name}" for p in (out / "overlays").glob("*.png"))
    write_json(out / "summary.json", summary)
    files.append("summary.json")
    inputs = {"model": config.model}
    if config.data is not None:
        inputs["data"] = Path(config.data).parent
    folder.finish(to_dict(config), inputs=inputs, seed=config.seed, files=files)
    shutil.rmtree(parts, ignore_errors=True)
    return summary


BOX_RULES = {
    "union": "each phrase against the union of all boxes of its image and class (the paper's Table 1)",
    "per-phrase": "each phrase against the union of its own boxes (the paper's phrase grounding, Table 3)",
    "per-box": "each box of a phrase scored on its own",
}
_SCORE_COLUMNS = [
    "run",
    "sample",
    "dicom_id",
    "category",
    "phrase",
    "tokens",
    "token_text",
    "token_source",
    "box",
    "auc_roc",
    "top1",
    "cnr",
]
METRICS = ("auc_roc", "top1", "cnr")


def _write_parquet(frame: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def _mean_std(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if array.size > 1 else 0.0}


def _tables(scores: Any, runs: int) -> dict[str, Any]:
    """Per-class means and the average over samples, each as mean ± std over runs."""
    if scores.empty:
        return {"classes": {}, "average": None}
    per_run = [scores[scores["run"] == r] for r in range(runs)]
    classes = {}
    for category in sorted(scores["category"].unique()):
        runs_cat = [s[s["category"] == category] for s in per_run]
        classes[category] = {
            "n": int(len(runs_cat[0])),
            **{m: _mean_std([float(s[m].mean()) for s in runs_cat]) for m in METRICS},
        }
    average = {"n": int(len(per_run[0])), **{m: _mean_std([float(s[m].mean()) for s in per_run]) for m in METRICS}}
    return {"classes": classes, "average": average}


def word_analysis(words: Any, min_count: int) -> dict[str, Any]:
    """Table 6, counted as the paper did: within each class, the words (case kept; start and end tokens
    included) that occur in more than `min_count` of that class's phrases (the first run's); for each, the
    mean CNR (over all runs) when its first token is the map; the top 3 per class. `n` is the word's count
    in the class. `class_words`: the ranked words that contain one of the class's words, whatever their rank.
    `eos_cnr` is the end token's mean CNR over all classes (the paper quotes it)."""
    result: dict[str, Any] = {"min_count": min_count, "counting": "per class, case kept", "counts": {}, "top3": {}}
    if not len(words):
        return result
    first_run = words[words["run"] == words["run"].min()]
    counts = first_run.groupby(["category", "word"])["sample"].nunique()
    means = words.groupby(["category", "word"])["cnr"].mean()
    for category in sorted(counts.index.get_level_values(0).unique()):
        frequent = {w: int(n) for w, n in counts[category].items() if n > min_count}
        result["counts"][category] = dict(sorted(frequent.items(), key=lambda item: (-item[1], item[0])))
        ranked = sorted(frequent, key=lambda w: (-float(means[(category, w)]), w))[:3]
        result["top3"][category] = [{"word": w, "cnr": float(means[(category, w)]), "n": frequent[w]} for w in ranked]
    from cxrdiff.data import CLASS_WORDS

    result["class_words"] = {  # the class's own words (e.g. "cardiomegaly", "cardiac") among the ranked ones
        category: [
            {"word": w, "cnr": float(means[(category, w)]), "n": n}
            for w, n in frequent.items()
            if any(k in w.lower() for k in CLASS_WORDS.get(category, ()))
        ]
        for category, frequent in result["counts"].items()
    }
    eos = words[words["word"] == SPECIAL[1]]["cnr"]
    result["eos_cnr"] = float(eos.mean()) if len(eos) else None
    return result


def _result(out: Path, summary: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"out": str(out), "samples": summary.get("samples")}
    average = summary.get("average")
    if average:
        for m in METRICS:
            result[m] = round(average[m]["mean"], 4)
            result[f"{m}_std"] = round(average[m]["std"], 4)
    result["heatmaps"] = str(out / "heatmaps.npz")
    if (out / "scores.parquet").is_file():
        result["scores"] = str(out / "scores.parquet")
    return result
