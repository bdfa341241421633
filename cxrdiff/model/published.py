"""`cxrdiff model random`: a released Stable Diffusion architecture (its exact configs, written out here) with
seeded random weights, built offline."""

from __future__ import annotations

import contextlib
import gzip
import math
import os
from pathlib import Path
from typing import Any

from cxrdiff.artifacts import MANIFEST, read_manifest
from cxrdiff.errors import InputError
from cxrdiff.model.tiny import clip_tokenizer
from cxrdiff.models import Components, parameter_counts, refuse_existing, save_components, text_width
from cxrdiff.text_encoders import (
    PUBLISHED_TEXT_ENCODERS,
    TextEncoderRecord,
    TextParts,
    new_projection,
    published_text_encoder,
)

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


def _sd2(pixels: int, scheduler: str, prediction_type: str) -> dict[str, Any]:
    """An SD2 release's configs: the two differ in image size, scheduler and prediction type only."""
    return {
        "unet": {**_SD2_UNET, "sample_size": pixels // 8},
        "vae": {**_SD_VAE, "sample_size": pixels},
        "text_encoder": _SD2_TEXT,
        "pad_token": "!",
        "scheduler": (scheduler, {**_SD_SCHEDULER, "prediction_type": prediction_type}),
        "parameters": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863},
    }


PUBLISHED: dict[str, dict[str, Any]] = {
    "sd2-base": _sd2(512, "PNDMScheduler", "epsilon"),  # stabilityai/stable-diffusion-2-base
    "sd2-768": _sd2(768, "DDIMScheduler", "v_prediction"),  # stabilityai/stable-diffusion-2
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
