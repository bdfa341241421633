"""`cxrdiff model tiny`: tiny, randomly initialised SD2-shaped models with the real CLIP vocabulary, for tests
and the demo."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path
from typing import Any

from cxrdiff.artifacts import MANIFEST, read_manifest
from cxrdiff.errors import InputError
from cxrdiff.models import Components, describe, refuse_existing, save_components


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
