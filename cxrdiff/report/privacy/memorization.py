"""Dutt et al.'s memorization score on a run's own training prompts and as many held-out ones, with the words
that carry it (each word's share of the prompt's cross-attention over the same trajectory)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import MANIFEST, read_manifest
from cxrdiff.report.config import ReportConfig
from cxrdiff.report.steps import read_table

TOP_WORDS = 8  # the words kept per prompt and over a run, by their share of the score


def training_texts(model: Path, train: Any, count: int, seed: int) -> list[str]:
    """Up to `count` distinct, non-empty training texts as the run trained on them (its prompt source and
    --deid-markers, from its manifest; a base model: the impressions), drawn with a fixed seed."""
    from cxrdiff.data import LABELS
    from cxrdiff.training_text import TrainingText

    config = read_manifest(model).get("config", {}) if (Path(model) / MANIFEST).is_file() else {}
    source = config.get("prompt_source") or "impression"
    if source.startswith("file:") and not Path(source[5:]).is_file():
        source = "impression"  # the run's prompt file has moved: its impressions stand in
    labels = np.stack([train[c].to_numpy(np.float32) if c in train else np.full(len(train), np.nan) for c in LABELS], 1)
    impressions = list(train["impression"]) if "impression" in train else [""] * len(train)
    text = TrainingText(source, impressions, labels, 0.0, deid_markers=config.get("deid_markers") or "keep")
    rng = np.random.default_rng(seed)
    texts = [text.text(int(i), rng) for i in rng.permutation(len(train))[: count * 4]]
    return list(dict.fromkeys(t for t in texts if t.strip()))[:count]


def word_shares(tokenizer: Any, prompt: str, mass: np.ndarray) -> list[tuple[str, float]]:
    """Each word's share of the cross-attention the prompt's word tokens receive (start, end and padding
    tokens left out), highest first; `mass` is the attention per token position (77,)."""
    from cxrdiff.tokens import context_length, prompt_words

    limit = context_length(tokenizer) - 1
    try:
        words = prompt_words(tokenizer, prompt)
    except AssertionError:  # a prompt whose word-wise tokenisation differs: no attribution
        return []
    # a word without letters or digits keeps its own punctuation as its name ("___," → "___")
    spans = [(w.bare if any(c.isalnum() for c in w.bare) else w.bare.strip(".,;:!?()"), w.positions) for w in words]
    spans = [(bare or "?", [p for p in positions if p < limit]) for bare, positions in spans]
    total = sum(float(mass[p]) for _, ps in spans for p in ps)
    if total <= 0:
        return []
    shares: dict[str, float] = {}
    for bare, positions in spans:
        shares[bare] = shares.get(bare, 0.0) + sum(float(mass[p]) for p in positions) / total
    return sorted(shares.items(), key=lambda item: -item[1])


def score_prompts(comps: Any, prompts: Sequence[str], config: ReportConfig, device: Any) -> list[dict[str, Any]]:
    """Each prompt's memorization score (the mean over its --memorization-noise draws) and its words' shares of
    the conditional cross-attention over the same trajectory."""
    import torch
    from diffusers import DDIMScheduler

    from cxrdiff.attention import AttentionCapture
    from cxrdiff.metrics.privacy import memorization_score
    from cxrdiff.seeds import image_seed
    from cxrdiff.text_encoders import encode_text

    scheduler = DDIMScheduler.from_config(comps.scheduler.config, clip_sample=False)
    uncond = encode_text(comps, [""], device)  # (1, tokens, dim)
    noise = config.memorization_noise
    latent_shape = comps.latent_shape
    per_batch = max(1, config.batch_size // noise)
    out = []
    for start in range(0, len(prompts), per_batch):
        chunk = list(prompts[start : start + per_batch])
        rows = [p for p in chunk for _ in range(noise)]
        latents = torch.stack(
            [
                torch.randn(
                    latent_shape, generator=torch.Generator().manual_seed(image_seed(config.seed, start + i, r))
                )
                for i in range(len(chunk))
                for r in range(noise)
            ]
        ).to(device)  # (rows, C, h, w)
        cond = encode_text(comps, rows, device)  # (rows, tokens, dim)
        with AttentionCapture(comps.unet, latent_shape[1:], drop_uncond=True) as capture:
            capture.active = True
            scores = memorization_score(
                comps.unet,
                latents,
                cond,
                uncond,
                scheduler,
                timesteps=config.memorization_steps,
                guidance_scale=config.guidance,
            )  # (rows,)
            mass = capture.maps().mean(dim=(2, 3)).cpu().numpy()  # (rows, tokens)
        for i, prompt in enumerate(chunk):
            rows_of = slice(i * noise, (i + 1) * noise)
            out.append(
                {
                    "prompt": prompt,
                    "score": float(scores[rows_of].mean()),
                    "words": [[w, round(s, 4)] for w, s in word_shares(comps.tokenizer, prompt, mass[rows_of].mean(0))],
                }
            )
    return out


def _summary(scored: list[dict[str, Any]]) -> dict[str, Any]:
    values = np.array([s["score"] for s in scored], dtype=np.float64)
    ranked = sorted(scored, key=lambda s: -s["score"])
    return {
        "n": len(scored),
        "mean": float(values.mean()) if len(values) else None,
        "std": float(values.std(ddof=1)) if len(values) > 1 else None,
        "prompts": [{**s, "words": s["words"][:TOP_WORDS]} for s in ranked],
    }


def word_attribution(scored: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The words that carry most of the summed score: each word's share of a prompt's attention times the
    prompt's score, summed over the prompts, as a share of the summed scores; with its prompt count."""
    total = sum(s["score"] for s in scored)
    carried: dict[str, list[float]] = {}
    for s in scored:
        for word, share in s["words"]:
            carried.setdefault(word, []).append(share * s["score"])
    ranked = sorted(carried.items(), key=lambda item: -sum(item[1]))[:TOP_WORDS]
    return [{"word": w, "share": sum(v) / total if total else 0.0, "prompts": len(v)} for w, v in ranked]


def memorization(config: ReportConfig, model: Path, real: Path, train: Any) -> dict[str, Any]:
    """Dutt et al.'s memorization score on `--memorization-prompts` training texts and as many held-out test
    prompts, with the words that carry it."""
    if config.memorization_prompts == 0:
        return {"skipped": "--memorization-prompts 0"}
    import torch

    from cxrdiff.models import load_components

    device = torch.device(config.device)
    comps = load_components(model, device=device)
    train_texts = training_texts(model, train, config.memorization_prompts, config.seed)
    test = read_table(real / "test.parquet")
    held = [str(t) for t in test["impression"] if str(t).strip()] if "impression" in test else []
    rng = np.random.default_rng(config.seed + 1)
    held = [held[i] for i in rng.permutation(len(held))[: config.memorization_prompts]]
    trained = score_prompts(comps, train_texts, config, device)
    held_out = score_prompts(comps, held, config, device)
    return {
        "steps": config.memorization_steps,
        "noise_per_prompt": config.memorization_noise,
        "guidance": config.guidance,
        "scheduler": "DDIM",
        "latent_elements": int(np.prod(comps.latent_shape)),
        "training": _summary(trained),
        "held_out": _summary(held_out),
        "words": word_attribution(trained),
    }
