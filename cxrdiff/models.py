"""Base-model folders: load a local diffusers Stable Diffusion folder offline, save one back, and
build tiny SD2-shaped models (with the real CLIP vocabulary) for tests and the demo.

Everything here reads shapes from the folder's configs, so SD 1.x, SD2-base (epsilon) and SD2-768
(v-prediction) folders load through the same code as the tiny model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cxrdiff.artifacts import atomic_dir, content_hash
from cxrdiff.errors import InputError, unsafe_pickle
from cxrdiff.text_encoders import (
    RECORD,
    TextParts,
    label,
    load_text_parts,
    save_text_parts,
)

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_PART_FILES = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer_config.json",),
    "scheduler": ("scheduler_config.json",),
}
_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


@dataclasses.dataclass
class Components:
    """The five parts of a Stable Diffusion folder, loaded."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    path: Path | None = None
    text_projection: Any = None  # the learned map from a text encoder's width to the UNet's, where they differ
    text_record: Any = None  # text_encoders.TextEncoderRecord; None: SD's own CLIP pair

    @property
    def text(self) -> TextParts:
        """The text side as `text_encoders` takes it (encoder, tokenizer, projection, record)."""
        return TextParts(self.text_encoder, self.tokenizer, self.text_projection, self.text_record)

    def use_text(self, parts: TextParts) -> None:
        """Condition on another text side (`finetune --text-encoder`)."""
        self.text_encoder, self.tokenizer = parts.encoder, parts.tokenizer
        self.text_projection, self.text_record = parts.projection, parts.record

    @property
    def native(self) -> bool:
        """Whether diffusers' StableDiffusionPipeline encodes prompts for these components by itself."""
        return self.text_record is None or self.text_record.native

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image size the UNet was built for: latent size × VAE factor."""
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.resolution // self.vae_scale_factor
        return (int(self.unet.config.in_channels), size, size)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.get("prediction_type", "epsilon"))


def check_model_folder(path: str | os.PathLike) -> Path:
    """Refuse, before any weight is read, a folder that is not a complete diffusers SD folder."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: model folder not found (give a local diffusers Stable Diffusion folder)")
    if not path.is_dir():
        raise InputError(f"{path}: not a folder (expected a diffusers Stable Diffusion folder)")
    index = path / "model_index.json"
    if not index.is_file():
        raise InputError(f"{path}: no model_index.json; not a diffusers pipeline folder")
    try:
        json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{index}: not valid JSON ({exc})") from None
    for part in PARTS:
        folder = path / part
        if not folder.is_dir():
            raise InputError(f"{path}: missing the {part}/ folder")
        for name in _PART_FILES[part]:
            if not (folder / name).is_file():
                raise InputError(f"{folder}: missing {name}")
        if part in ("unet", "vae", "text_encoder") and not any(
            p.name in _WEIGHT_NAMES or p.name.endswith(".safetensors") for p in folder.iterdir()
        ):
            raise InputError(f"{folder}: no weight file ({' or '.join(_WEIGHT_NAMES[:2])})")
    check_part_configs(path)
    return path


def check_sampling_steps(model: str | os.PathLike, steps: int, flag: str = "--steps") -> None:
    """Refuse more sampling steps than the scheduler was trained with (diffusers would fail only after the
    weights are loaded): one line naming the limit, before anything is read or claimed."""
    config = Path(model) / "scheduler" / "scheduler_config.json"
    try:
        trained = int(json.loads(config.read_text()).get("num_train_timesteps", 1000))
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise InputError(f"{config}: unreadable ({exc})") from None
    if steps > trained:
        raise InputError(f"{flag} {steps}: above the {trained} steps the scheduler was trained with ({config})")


_BUILT: set[str] = set()  # digests of the part configs already built in this process


def check_part_configs(path: Path) -> None:
    """Build the UNet, VAE and text encoder from their configs with empty weights (accelerate's
    `init_empty_weights`, as `published_modules`: no memory, no weights read; about half a second for SD's
    sizes, once per process for the same configs) and the scheduler from its own, so that a mistyped field
    (`"latent_channels": "4"`) is refused here in one line naming the file, and `doctor` reports it, instead of
    a TypeError deep in a step."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    builders = {
        "unet": ("config.json", UNet2DConditionModel.from_config),
        "vae": ("config.json", AutoencoderKL.from_config),
        "text_encoder": ("config.json", lambda config: CLIPTextModel(CLIPTextConfig.from_dict(config))),
        "scheduler": ("scheduler_config.json", lambda config: _scheduler_class(path).from_config(config)),
    }
    files = {part: path / part / name for part, (name, _) in builders.items()}
    digest = hashlib.sha256(b"".join(file.read_bytes() + b"\0" for file in files.values()))
    digest.update((path / "model_index.json").read_bytes())  # it names the scheduler's class
    if digest.hexdigest() in _BUILT:
        return
    for part, (_, build) in builders.items():
        try:
            config = json.loads(files[part].read_text())
            if not isinstance(config, dict):
                raise TypeError("not a JSON object")
            with init_empty_weights():
                build(config)
        except InputError:
            raise
        except Exception as exc:  # any failure to build from the file is the file's fault: say which file
            raise InputError(f"{files[part]}: cannot build the {part} from it ({_first_line(exc)})") from None
    _BUILT.add(digest.hexdigest())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def load_components(path: str | os.PathLike, device: Any = None, dtype: Any = None) -> Components:
    """Load a local SD folder offline; malformed parts are one-line errors naming the part."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = check_model_folder(path)
    loaded: dict[str, Any] = {}
    for part, load in (
        ("unet", UNet2DConditionModel.from_pretrained),
        ("vae", AutoencoderKL.from_pretrained),
        ("scheduler", _scheduler_class(path).from_pretrained),
    ):
        try:
            loaded[part] = load(path / part, local_files_only=True)
        except pickle.UnpicklingError:
            raise unsafe_pickle(path / part) from None
        except (OSError, ValueError, TypeError, json.JSONDecodeError, RuntimeError) as exc:
            raise InputError(f"{path / part}: cannot load {part} ({_first_line(exc)})") from None
    text = load_text_parts(path)  # SD's CLIP pair, or what the folder's text encoder record names
    comps = Components(**loaded, text_encoder=text.encoder, tokenizer=text.tokenizer, path=path)
    comps.use_text(text)
    for module in (comps.unet, comps.vae, comps.text_encoder, comps.text_projection):
        if module is None:
            continue
        module.eval().requires_grad_(False)
        if device is not None or dtype is not None:
            module.to(device=device, dtype=dtype)
    width = text.record.cross_attention_dim if text.projection is not None else text_width(comps.text_encoder)
    if width != comps.unet.config.cross_attention_dim:
        raise InputError(
            f"{path}: text encoder width {width} does not match the UNet's "
            f"cross_attention_dim {comps.unet.config.cross_attention_dim}"
        )
    torch.set_grad_enabled(True)
    return comps


def text_width(encoder: Any) -> int:
    """A text encoder's hidden size from its config (hidden_size, or d_model for T5-like encoders)."""
    config = encoder.config
    return int(getattr(config, "hidden_size", None) or config.d_model)


def load_pipeline(path: str | os.PathLike, scheduler: Any = None, device: Any = None, dtype: Any = None) -> Any:
    """A `StableDiffusionPipeline` over a local folder, offline, safety checker off."""
    return pipeline(load_components(path, device=device, dtype=dtype), scheduler)


def pipeline(comps: Components, scheduler: Any = None, text: bool = True) -> Any:
    """The components as a `StableDiffusionPipeline` (no safety checker: these are radiographs); `text=False`
    leaves the text encoder and tokenizer out (a folder whose prompts are encoded by `text_encoders.encode`
    and given to the pipeline as `prompt_embeds`)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=comps.vae,
        text_encoder=comps.text_encoder if text else None,
        tokenizer=comps.tokenizer if text else None,
        unet=comps.unet,
        scheduler=scheduler or comps.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _scheduler_class(path: str | os.PathLike) -> Any:
    """The scheduler class the folder's model_index.json names (PNDM for SD2-base)."""
    import diffusers

    index = json.loads((Path(path) / "model_index.json").read_text())
    name = (index.get("scheduler") or [None, "PNDMScheduler"])[1]
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise InputError(f"{Path(path) / 'model_index.json'}: unknown scheduler class {name!r}")
    return cls


def save_components(comps: Components, out: str | os.PathLike, scheduler: Any = None) -> Path:
    """Write a diffusers SD folder that `StableDiffusionPipeline.from_pretrained(out)` loads. With another text
    encoder than SD's CLIP (or a projection), model_index.json names none ([null, null]): the pipeline loads
    without one and takes `prompt_embeds`; `text_encoder/`, `tokenizer/`, `text_projection/` and the record are
    written by `text_encoders.save_text_parts` (README, "Text encoders").

    Written to a temporary folder and renamed, so a killed save never leaves a half model.
    """
    out = Path(out)
    pipe = pipeline(comps, scheduler, text=comps.native)
    with atomic_dir(out) as tmp, _quiet_diffusers(not comps.native):  # it warns that None parts are not saved
        pipe.save_pretrained(tmp, safe_serialization=True)
        save_text_parts(comps.text, tmp, plain=comps.native)
        keep = [p for p in out.iterdir()] if out.is_dir() else []
        for extra in keep:  # files beside the model (manifest, logs) survive a re-save
            if not (tmp / extra.name).exists() and extra.is_file() and extra.name != RECORD:
                (tmp / extra.name).write_bytes(extra.read_bytes())
    return out


@contextlib.contextmanager
def _quiet_diffusers(quiet: bool) -> Any:
    from diffusers.utils import logging as diffusers_logging

    before = diffusers_logging.get_verbosity()
    if quiet:
        diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(before)


def model_geometry(base_model: Path, resolution: int | None) -> tuple[int, tuple[int, int, int], float]:
    """(resolution, latent shape, scaling factor) from the folder's configs alone, no weights read."""

    def config(part: str) -> SimpleNamespace:
        path = base_model / part / "config.json"
        try:
            return SimpleNamespace(**json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: unreadable ({exc})") from None

    vae, unet = config("vae"), config("unet")
    comps = Components(unet=SimpleNamespace(config=unet), vae=SimpleNamespace(config=vae), text_encoder=None,
                       tokenizer=None, scheduler=None)  # fmt: skip
    factor = comps.vae_scale_factor
    resolution = comps.resolution if resolution is None else int(resolution)
    if resolution < factor or resolution % factor:
        raise InputError(f"--resolution {resolution}: must be a positive multiple of the VAE's factor {factor}")
    latent_shape = (int(vae.latent_channels), resolution // factor, resolution // factor)
    return resolution, latent_shape, float(getattr(vae, "scaling_factor", 0.18215))


FINGERPRINT_PREFIX = "sha256+weights:"  # over the weights' contents; a "sha256:" one covers names and sizes only


def vae_fingerprint(base_model: str | os.PathLike) -> str:
    """sha256 of the VAE's config.json and its weight files' names and contents: a later step refuses
    latents made by another VAE, even one of the same size. Each file's hash is kept for this process by
    (path, size, mtime), so an SD VAE's 335 MB are read once per run."""
    vae = Path(base_model) / "vae"
    digest = hashlib.sha256((vae / "config.json").read_bytes())
    for weights in sorted(p for p in vae.iterdir() if p.suffix in (".safetensors", ".bin")):
        digest.update(f"{weights.name}:{content_hash(weights)}".encode())
    return FINGERPRINT_PREFIX + digest.hexdigest()


def fingerprint_covers_weights(fingerprint: str) -> bool:
    """False for a "sha256:" fingerprint (config, file names and sizes only)."""
    return fingerprint.startswith(FINGERPRINT_PREFIX)


def names_and_sizes_fingerprint(base_model: str | os.PathLike) -> str:
    """The "sha256:" fingerprint (config, weight file names and sizes): what a folder that recorded one is
    compared with."""
    vae = Path(base_model) / "vae"
    digest = hashlib.sha256((vae / "config.json").read_bytes())
    for weights in sorted(p for p in vae.iterdir() if p.suffix in (".safetensors", ".bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return "sha256:" + digest.hexdigest()


def refuse_existing(out: str | os.PathLike, what: str) -> None:
    """A model is written into a new (or empty) folder only: never over the weights of another."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; give a new folder for {what}")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"{out}: not empty; give a new folder for {what}")


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Resolution, latent shape and sizes of a model folder (`cxrdiff model info`)."""
    comps = load_components(path)
    return {
        "resolution": comps.resolution,
        "latent_shape": list(comps.latent_shape),
        "prediction_type": comps.prediction_type,
        "scaling_factor": comps.scaling_factor,
        "text_encoder": label(comps.text_record),
        "text_projection": comps.text_projection is not None,
        "context_length": int(comps.tokenizer.model_max_length),
        "vocab_size": len(comps.tokenizer),
        **{f"{part}_parameters": n for part, n in parameter_counts(comps).items()},
    }


def parameter_counts(comps: Any) -> dict[str, int]:
    """Parameters of the UNet, the text encoder and the VAE (`comps` or a dict of those modules), and of the
    text projection where there is one."""
    parts = comps if isinstance(comps, dict) else {p: getattr(comps, p) for p in ("unet", "text_encoder", "vae")}
    counts = {part: sum(p.numel() for p in parts[part].parameters()) for part in ("unet", "text_encoder", "vae")}
    projection = None if isinstance(comps, dict) else comps.text_projection
    if projection is not None:
        counts["text_projection"] = sum(p.numel() for p in projection.parameters())
    return counts
