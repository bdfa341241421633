"""Base-model folders: load a local diffusers Stable Diffusion folder offline, save one back, and
build tiny SD2-shaped models (with the real CLIP vocabulary) for tests and the demo.

Everything here reads shapes from the folder's configs, so SD 1.x, SD2-base (epsilon) and SD2-768
(v-prediction) folders load through the same code as the tiny model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import math
import os
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cxrdiff.artifacts import MANIFEST, atomic_dir, content_hash, read_manifest
from cxrdiff.errors import InputError, unsafe_pickle
from cxrdiff.text_encoders import (
    PUBLISHED_TEXT_ENCODERS,
    RECORD,
    TextEncoderRecord,
    TextParts,
    label,
    load_text_parts,
    new_projection,
    published_text_encoder,
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


FINGERPRINT_PREFIX = "sha256+weights:"  # earlier versions wrote "sha256:" over names and sizes only


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
    """False for a fingerprint written by an earlier cxrdiff (config, file names and sizes only)."""
    return fingerprint.startswith(FINGERPRINT_PREFIX)


def names_and_sizes_fingerprint(base_model: str | os.PathLike) -> str:
    """The fingerprint earlier versions recorded (config, weight file names and sizes): what a folder
    prepared by them can still be compared with."""
    vae = Path(base_model) / "vae"
    digest = hashlib.sha256((vae / "config.json").read_bytes())
    for weights in sorted(p for p in vae.iterdir() if p.suffix in (".safetensors", ".bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return "sha256:" + digest.hexdigest()


# --- the tiny model -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny SD2-shaped model: small enough for a training step well under a second on CPU."""

    resolution: int = 64
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 32, 64)  # 3 blocks: 4 pixels per latent cell
    unet_channels: tuple[int, ...] = (32, 64)
    heads: tuple[int, ...] = (2, 4)
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 2
    prediction_type: str = "epsilon"
    # Start the text encoder's self-attention output projections at zero, so that each position's
    # feature is its own token's, as word positions carry their word in a pretrained CLIP: the property
    # grounding relies on, which a random encoder lacks. Training can still learn to mix positions.
    token_local_text: bool = False

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


def clip_vocabulary_files(folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write CLIP's BPE vocabulary (49,408 tokens) as vocab.json + merges.txt from open_clip's copy.

    open_clip ships the exact vocabulary SD2's tokenizer uses; the transformers tokenizer needs it in
    its own two-file form, so we derive that here instead of downloading it.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(default_bpe()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    units = list(bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def clip_tokenizer(max_length: int = 77) -> Any:
    """The SD2 tokenizer (CLIP BPE, pad "!" = id 0), built offline."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        clip_vocabulary_files(tmp)
        return CLIPTokenizer.from_pretrained(tmp, pad_token="!", model_max_length=max_length)


def tiny_text_encoder(tokenizer: Any, width: int, layers: int, heads: int) -> Any:
    """A randomly initialised CLIP text encoder of the tiny models' shape, over `tokenizer`'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=width * 4,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=tokenizer.model_max_length,
            hidden_act="gelu",
            projection_dim=width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def tiny_components(spec: TinySpec = TinySpec(), seed: int = 0, text_encoder: Any = None) -> Components:
    """Randomly initialised, SD2-shaped components (same seed → same weights); `text_encoder`, a CLIP text
    model of width `spec.text_width` (e.g. from `cxrdiff model pretrain-text`), replaces the random one."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    factor = 2 ** (len(spec.vae_channels) - 1)
    smallest = factor * 2 ** len(spec.unet_channels)  # the UNet's deepest block still sees 2 × 2 cells
    if spec.resolution < smallest or spec.resolution % factor:
        raise InputError(
            f"--resolution {spec.resolution}: must be a positive multiple of {factor} (the VAE's factor), "
            f"at least {smallest}"
        )
    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    n = len(spec.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=spec.latent_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=spec.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=spec.text_width,
        attention_head_dim=spec.heads,
        use_linear_projection=True,  # as SD2
        norm_num_groups=min(32, spec.unet_channels[0]),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=spec.latent_channels,
        block_out_channels=spec.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        layers_per_block=1,
        norm_num_groups=min(32, spec.vae_channels[0]),
        sample_size=spec.resolution,
        scaling_factor=0.18215,
    )
    if text_encoder is None:
        text_encoder = tiny_text_encoder(tokenizer, spec.text_width, spec.text_layers, spec.text_heads)
    if text_encoder.config.hidden_size != spec.text_width:
        raise InputError(f"text encoder width {text_encoder.config.hidden_size} ≠ --text-width {spec.text_width}")
    if spec.token_local_text:
        for layer in getattr(text_encoder, "text_model", text_encoder).encoder.layers:  # transformers 4 / 5
            torch.nn.init.zeros_(layer.self_attn.out_proj.weight)
            torch.nn.init.zeros_(layer.self_attn.out_proj.bias)
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=spec.prediction_type,
    )
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def write_tiny_model(out: str | os.PathLike, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """`cxrdiff model tiny OUT`: a tiny random SD2-shaped diffusers folder."""
    return save_components(tiny_components(spec, seed), out)


def refuse_existing(out: str | os.PathLike, what: str) -> None:
    """A model is written into a new (or empty) folder only: never over the weights of another."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; give a new folder for {what}")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"{out}: not empty; give a new folder for {what}")


def write_tiny_model_cli(
    out: Path,
    resolution: int,
    unet_channels: str,
    text_width: int,
    prediction_type: str,
    seed: int,
    text_encoder: Path | None = None,
) -> dict[str, Any]:
    """The `cxrdiff model tiny` command body; `text_encoder`: a `pretrain-text` folder to use."""
    try:
        channels = tuple(int(c) for c in unet_channels.split(","))
    except ValueError:
        raise InputError(f"--unet-channels {unet_channels!r}: expected comma-separated integers") from None
    check_tiny_numbers(channels, text_width, seed)
    if prediction_type not in ("epsilon", "v_prediction"):
        raise InputError(f"--prediction-type {prediction_type!r}: expected epsilon or v_prediction")
    if (Path(out) / MANIFEST).is_file():  # a step's folder: writing here would swap its weights under its manifest
        step = read_manifest(out).get("step")
        raise InputError(f"{out}: is a '{step}' folder; give a new folder for the tiny model")
    refuse_existing(out, "the tiny model")  # a model folder: data prepared with its VAE would go stale
    heads = tuple(max(1, c // 16) for c in channels)
    spec = TinySpec(
        resolution=resolution,
        unet_channels=channels,
        heads=heads,
        text_width=text_width,
        prediction_type=prediction_type,
    )
    if text_encoder is not None:
        from cxrdiff.text_encoders import load_text_encoder

        save_components(tiny_components(spec, seed, load_text_encoder(text_encoder, text_width)), out)
    else:
        write_tiny_model(out, spec, seed)
    return {"model": str(out), **describe(out)}


def check_tiny_numbers(unet_channels: tuple[int, ...], text_width: int, seed: int) -> None:
    """`model tiny`'s numbers (the resolution is checked against the VAE in `tiny_components`): widths that
    build a UNet whose group norms divide them and a text encoder of two heads."""
    groups = min(32, unet_channels[0]) if unet_channels else 0
    if len(unet_channels) < 2 or groups < 1 or any(c < 1 or c % groups for c in unet_channels):
        raise InputError(
            f"--unet-channels {','.join(map(str, unet_channels))}: expected two or more positive widths, "
            f"each a multiple of {max(groups, 1)} (the group norm's groups: the first width, at most 32)"
        )
    if text_width < 2 or text_width % 2:
        raise InputError(f"--text-width {text_width}: must be a positive even number (two attention heads)")
    if seed < 0:
        raise InputError(f"--seed {seed}: must be at least 0")


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


# --- published architectures with random weights ----------------------------------------------
# The configurations of the released Stable Diffusion folders (their unet/, vae/, text_encoder/,
# tokenizer/ and scheduler/ configs on the Hugging Face Hub), written out so that a model of the exact
# architecture can be built offline. Parameter counts of the released weights, for checks.

_SD_UNET = {
    "act_fn": "silu",
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
_SD2_UNET = {
    **_SD_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}
_SD15_UNET = {**_SD_UNET, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64}
_SD_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}
_CLIP_TEXT = {  # ids as the released configs (transformers' legacy CLIP defaults; the tokenizer decides the real ids)
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "pad_token_id": 1,
    "vocab_size": 49408,
}
_SD2_TEXT = {  # OpenCLIP ViT-H/14's text tower less its last layer (SD2 uses the penultimate layer)
    **_CLIP_TEXT,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
}
_SD15_TEXT = {  # OpenAI CLIP ViT-L/14's text tower
    **_CLIP_TEXT,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}
_SD_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

PUBLISHED: dict[str, dict[str, Any]] = {
    "sd2-base": {  # stabilityai/stable-diffusion-2-base: 512 px, epsilon
        "unet": {**_SD2_UNET, "sample_size": 64},
        "vae": {**_SD_VAE, "sample_size": 512},
        "text_encoder": _SD2_TEXT,
        "pad_token": "!",
        "scheduler": ("PNDMScheduler", {**_SD_SCHEDULER, "prediction_type": "epsilon"}),
        "parameters": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863},
    },
    "sd2-768": {  # stabilityai/stable-diffusion-2: 768 px, v-prediction
        "unet": {**_SD2_UNET, "sample_size": 96},
        "vae": {**_SD_VAE, "sample_size": 768},
        "text_encoder": _SD2_TEXT,
        "pad_token": "!",
        "scheduler": ("DDIMScheduler", {**_SD_SCHEDULER, "prediction_type": "v_prediction"}),
        "parameters": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863},
    },
    "sd15": {  # runwayml/stable-diffusion-v1-5: 512 px, epsilon, pads with the end token
        "unet": _SD15_UNET,
        "vae": {**_SD_VAE, "sample_size": 512},
        "text_encoder": _SD15_TEXT,
        "pad_token": "<|endoftext|>",
        "scheduler": ("PNDMScheduler", {**_SD_SCHEDULER, "prediction_type": "epsilon"}),
        "parameters": {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
    },
}


def published_modules(like: str, device: str = "meta") -> dict[str, Any]:
    """The UNet, VAE and text encoder of a published architecture, with parameters on `device`.

    On `meta` (the default) nothing is allocated, so counting parameters or checking shapes costs
    nothing; `random_components` then fills each parameter once.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if like not in PUBLISHED:
        raise InputError(f"--like {like!r}: expected one of {', '.join(PUBLISHED)}")
    spec = PUBLISHED[like]
    with init_empty_weights() if device == "meta" else contextlib.nullcontext():  # buffers stay real
        return {
            "unet": UNet2DConditionModel(**spec["unet"]),
            "vae": AutoencoderKL(**spec["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])),
        }


def fill_random(module: Any, generator: Any) -> Any:
    """Give every (meta) parameter real, seeded values in one pass: normalisation layers weight 1 and bias
    0, embeddings N(0, 0.02), other biases 0, other weights N(0, 1/(3 fan_in)): the variance of PyTorch's
    default U(±1/√fan_in), drawn as a normal because CPU normal sampling is about twice as fast.

    Hand-written because the libraries' own initialisers run on construction (a second full-size init
    that dominates the time) and each draws from the global generator in its own order.
    """
    import torch

    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for sub in module.modules():
        for key, param in list(sub._parameters.items()):
            if param is None:
                continue
            value = torch.empty(param.shape, dtype=torch.float32)
            if isinstance(sub, norms):
                value.fill_(1.0 if key == "weight" else 0.0)
            elif isinstance(sub, torch.nn.Embedding):
                value.normal_(0.0, 0.02, generator=generator)
            elif param.ndim < 2:
                value.zero_()
            else:
                std = 1.0 / math.sqrt(3 * param[0].numel())  # fan_in = in features × kernel
                value.normal_(0.0, std, generator=generator)
            sub._parameters[key] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
    return module


def random_components(like: str, seed: int = 0, text_encoder_like: str | None = None) -> Components:
    """A published architecture (`sd2-base`, `sd2-768`, `sd15`) with seeded random weights; `text_encoder_like`
    (`bert-base`) conditions it on a random encoder of that shape instead of its CLIP, through a learned
    linear map to the UNet's width (as `finetune --text-encoder` would)."""
    import diffusers
    import torch

    spec = PUBLISHED.get(like)
    if spec is None:
        raise InputError(f"--like {like!r}: expected one of {', '.join(PUBLISHED)}")
    generator = torch.Generator().manual_seed(seed)
    modules = published_modules(like)
    if text_encoder_like is not None:
        modules["text_encoder"] = published_text_encoder(text_encoder_like)
    modules = {part: fill_random(m, generator) for part, m in modules.items()}
    tokenizer = clip_tokenizer() if text_encoder_like is None else bert_base_tokenizer()
    if text_encoder_like is None and spec["pad_token"] != tokenizer.pad_token:
        tokenizer.pad_token = spec["pad_token"]
    name, scheduler_config = spec["scheduler"]
    scheduler = getattr(diffusers, name).from_config(scheduler_config)
    comps = Components(**modules, tokenizer=tokenizer, scheduler=scheduler)
    if text_encoder_like is not None:
        width, cross = text_width(comps.text_encoder), int(spec["unet"]["cross_attention_dim"])
        record = TextEncoderRecord(
            kind="transformers", name=f"{text_encoder_like} (random)", origin="random", model_type="bert",
            identity=f"random {text_encoder_like}, seed {seed}", width=width, cross_attention_dim=cross,
            projection=width != cross, context_length=int(tokenizer.model_max_length), attention_mask=True,
            trust_remote_code=False,
        )  # fmt: skip
        projection = new_projection(width, cross, seed) if record.projection else None
        comps.use_text(TextParts(comps.text_encoder, tokenizer, projection, record))
    return comps


def bert_base_tokenizer() -> Any:
    """A WordPiece tokenizer of BERT-base's size (30,522 entries, context 512), built offline: BERT's special
    tokens, every letter, digit and ASCII punctuation mark alone and as a '##' continuation (so any text
    tokenizes), then CLIP's whole words in its vocabulary's order, padded with [unusedN] as BERT's own."""
    import string

    from cxrdiff.text_encoders import BERT_SPECIALS, vocabulary_tokenizer

    size = PUBLISHED_TEXT_ENCODERS["bert-base"]["config"]["vocab_size"]
    with gzip.open(_clip_bpe()) as handle:
        merges = handle.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    singles = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = [*BERT_SPECIALS, *singles, *(f"##{c}" for c in string.ascii_lowercase + string.digits)]
    seen = set(vocab)
    for merge in merges:
        word = "".join(merge.split())
        if word.endswith("</w>") and word[:-4].isascii() and word[:-4].isalnum() and word[:-4] not in seen:
            vocab.append(word[:-4])
            seen.add(word[:-4])
        if len(vocab) == size:
            break
    vocab += [f"[unused{i}]" for i in range(size - len(vocab))]
    return vocabulary_tokenizer(vocab, PUBLISHED_TEXT_ENCODERS["bert-base"]["config"]["max_position_embeddings"])


def _clip_bpe() -> str:
    from open_clip.tokenizer import default_bpe

    return default_bpe()


def write_random_model(
    out: str | os.PathLike, like: str, seed: int = 0, text_encoder_like: str | None = None
) -> dict[str, Any]:
    """`cxrdiff model random OUT --like sd2-base [--text-encoder-like bert-base]`: a diffusers folder of that
    architecture, random weights."""
    if (Path(out) / MANIFEST).is_file():
        step = read_manifest(out).get("step")
        raise InputError(f"{out}: is a '{step}' folder; give a new folder for the random model")
    refuse_existing(out, "the random model")
    comps = random_components(like, seed, text_encoder_like)
    counts = parameter_counts(comps)
    save_components(comps, out)
    described = {"like": like, "seed": seed} | ({"text_encoder_like": text_encoder_like} if text_encoder_like else {})
    return {"model": str(out), **described, **{f"{k}_parameters": v for k, v in counts.items()}}


def parameter_counts(comps: Any) -> dict[str, int]:
    """Parameters of the UNet, the text encoder and the VAE (`comps` or a dict of those modules), and of the
    text projection where there is one."""
    parts = comps if isinstance(comps, dict) else {p: getattr(comps, p) for p in ("unet", "text_encoder", "vae")}
    counts = {part: sum(p.numel() for p in parts[part].parameters()) for part in ("unet", "text_encoder", "vae")}
    projection = None if isinstance(comps, dict) else comps.text_projection
    if projection is not None:
        counts["text_projection"] = sum(p.numel() for p in projection.parameters())
    return counts
