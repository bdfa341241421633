"""Validation images rendered with the current weights during training (`--validation-prompts`), saved and
sent to the run's trackers."""

from __future__ import annotations

from cxrdiff.artifacts import (
    atomic_path,
)
from cxrdiff.finetune.tracking import track_images
from cxrdiff.finetune.training import TrainingRun
from cxrdiff.text_encoders import TextParts, encode


def validate(run: TrainingRun, step: int) -> None:
    """Render the validation prompts with the current weights (main process; others wait)."""
    import torch

    accelerator, comps, config = run.accelerator, run.comps, run.config
    if run.main:
        from diffusers import StableDiffusionPipeline

        inner = accelerator.unwrap_model(run.model)
        text = TextParts(inner.text_encoder, comps.tokenizer, inner.text_projection, comps.text_record)
        pipe = StableDiffusionPipeline(
            vae=comps.vae.to(accelerator.device),
            text_encoder=inner.text_encoder,
            tokenizer=comps.tokenizer,
            unet=inner.unet,
            scheduler=comps.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        folder = run.out / "validation" / f"step-{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        inner.eval()
        images = []
        with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
            for i, prompt in enumerate(config.validation_prompts):
                generator = torch.Generator(accelerator.device).manual_seed(config.seed + i)
                embeds = [encode(text, [p], accelerator.device) for p in (prompt, "")]  # the run's own encoding
                image = pipe(
                    prompt_embeds=embeds[0],
                    negative_prompt_embeds=embeds[1],
                    num_inference_steps=config.validation_steps,
                    generator=generator,
                ).images[0]
                with atomic_path(folder / f"{i:02d}.png") as tmp:
                    image.save(tmp, format="PNG")
                images.append(image)
        track_images(accelerator, images, step)
        inner.unet.train()
        inner.text_encoder.train(not config.frozen_text)
        comps.vae.to("cpu")
    accelerator.wait_for_everyone()
