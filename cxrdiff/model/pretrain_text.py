"""`cxrdiff model pretrain-text`: CLIP-style contrastive pretraining of a tiny text encoder.

SD2's text encoder arrives pretrained on image–caption pairs (OpenCLIP); a tiny random one does not, and
"token-local" initialisation only imitates one property of a pretrained encoder by construction. This
trains a tiny CLIP text tower together with a small image tower (thrown away afterwards) on image–report
pairs with CLIP's symmetric contrastive loss, so that a tiny model's frozen/learnable comparison starts,
as the paper's does, from an encoder whose words were tied to pictures by learning.

The text tower is transformers' `CLIPTextModel` (the class SD folders load), pooled at the end token as
CLIP pools, with a linear projection that is discarded like the image tower; the result is a
`text_encoder/` + `tokenizer/` pair that `cxrdiff model tiny --text-encoder` puts into a tiny SD folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from cxrdiff.artifacts import StepFolder, atomic_dir
from cxrdiff.config import Range, check_ranges, settings, to_dict
from cxrdiff.console import log
from cxrdiff.errors import InputError
from cxrdiff.model.pretrain import CHECKPOINT, PretrainConfig, batch_index, pretrain_loop, pretrain_result, write_losses

STEP = "pretrain-text"


@dataclasses.dataclass(frozen=True)
class PretrainTextConfig(PretrainConfig):
    """Settings of one contrastive pretraining run: `PretrainConfig`'s, and the towers' sizes."""

    resolution: Annotated[int, Range(ge=16)] = 64
    text_width: Annotated[int, Range(ge=1)] = 32
    text_layers: Annotated[int, Range(ge=1)] = 2
    text_heads: Annotated[int, Range(ge=1)] = 2


# --- data --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pairs:
    """Images (uint8, (N, H, W)), their report texts and patients, in a fixed order."""

    images: np.ndarray
    texts: list[str]
    subjects: np.ndarray
    dicom_ids: list[str] = dataclasses.field(default_factory=list)

    def subset(self, index: np.ndarray) -> Pairs:
        ids = [self.dicom_ids[i] for i in index] if self.dicom_ids else []
        return Pairs(self.images[index], [self.texts[i] for i in index], self.subjects[index], ids)


def ms_cxr_file(config: PretrainConfig) -> Path:
    """The MS-CXR box CSV whose images pretraining leaves out: --ms-cxr, else the one a phantom tree holds."""
    from cxrdiff.phantom.config import MS_CXR_FILE

    path = Path(config.ms_cxr) if config.ms_cxr is not None else Path(config.data) / MS_CXR_FILE
    if not path.is_file():
        raise InputError(
            f"--ms-cxr {path}: file not found; give MS-CXR's CSV so that its images (the grounding test set) are "
            "not pretrained on"
        )
    return path


def read_pairs(
    root: str | os.PathLike, resolution: int, ms_cxr: str | os.PathLike, limit: int | None = None,
    text_fallback: str = "none",
) -> Pairs:  # fmt: skip
    """Frontal training images with their report's text, chosen as `prepare` chooses its training rows: outside
    p19 (MIMIC's test patients) and MS-CXR's images (the grounding test set), the impression (or the
    `text_fallback` sections) longer than 7 characters; images without one, or without a file, are left out."""
    from cxrdiff.data import (
        TEST_PATIENT_FOLDER,
        VIEWS_KEPT,
        files_root,
        find_table,
        patient_folder,
        read_metadata,
        read_ms_cxr,
    )
    from cxrdiff.images import load_grayscale, resize_center_crop
    from cxrdiff.impressions import MIN_IMPRESSION_CHARS, read_report, report_path
    from cxrdiff.prepare import text_fallbacks

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--data {root}: not a folder")
    held_out_images = set(read_ms_cxr(ms_cxr)["dicom_id"])
    meta = read_metadata(find_table(root, "metadata"))
    meta = meta[meta["ViewPosition"].isin(VIEWS_KEPT)].sort_values(["subject_id", "study_id", "dicom_id"])
    files, fallbacks = files_root(root), text_fallbacks(text_fallback)
    images, texts, subjects, ids = [], [], [], []
    for row in meta.itertuples():
        if patient_folder(row.subject_id) == TEST_PATIENT_FOLDER or row.dicom_id in held_out_images:
            continue
        text, source, fault = read_report(report_path(files, row.subject_id, row.study_id), fallbacks)
        study = files / patient_folder(row.subject_id) / f"p{row.subject_id}" / f"s{row.study_id}"
        path = next((p for p in (study / f"{row.dicom_id}.jpg", study / f"{row.dicom_id}.dcm") if p.is_file()), None)
        if fault or source == "none" or len(text) < MIN_IMPRESSION_CHARS or path is None:
            continue
        images.append(resize_center_crop(load_grayscale(path), resolution))
        texts.append(text)
        subjects.append(int(row.subject_id))
        ids.append(str(row.dicom_id))
        if limit is not None and len(texts) >= limit:
            break
    if len(texts) < 8:
        raise InputError(f"--data {root}: only {len(texts)} usable image–report pairs (need at least 8)")
    return Pairs(np.stack(images), texts, np.array(subjects), ids)


def split_held_out(pairs: Pairs, held_out: int, seed: int) -> tuple[Pairs, Pairs]:
    """Whole patients, drawn at random, until at least `held_out` pairs are kept out (none of a held-out
    patient's images is trained on)."""
    rng = np.random.default_rng(seed)
    patients = rng.permutation(np.unique(pairs.subjects))
    kept: list[int] = []
    count = 0
    for patient in patients:
        if count >= held_out:
            break
        kept.append(int(patient))
        count += int((pairs.subjects == patient).sum())
    test = np.isin(pairs.subjects, kept)
    if test.all():
        raise InputError(f"--held-out {held_out}: leaves no pairs to train on ({len(pairs.texts)} in all)")
    return pairs.subset(np.flatnonzero(~test)), pairs.subset(np.flatnonzero(test))


# --- the two towers ----------------------------------------------------------------------------


def text_tower(config: PretrainTextConfig, tokenizer: Any) -> Any:
    """A randomly initialised CLIP text encoder of the tiny SD model's shape (see `model.tiny.TinySpec`)."""
    from cxrdiff.model.tiny import tiny_text_encoder

    return tiny_text_encoder(tokenizer, config.text_width, config.text_layers, config.text_heads)


def image_tower(width: int) -> Any:
    """A small CNN: four stride-2 convolutions, global average pooling, a linear map to `width`."""
    from torch import nn

    layers: list[Any] = []
    channels = (1, 16, 32, 64, 64)
    for c_in, c_out in zip(channels, channels[1:], strict=False):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], width))


class Towers:
    """Text tower + its projection, image tower, CLIP's learnable temperature."""

    def __init__(self, config: PretrainTextConfig, tokenizer: Any) -> None:
        import torch

        torch.manual_seed(config.seed)
        self.text = text_tower(config, tokenizer)
        self.projection = torch.nn.Linear(config.text_width, config.text_width, bias=False)
        self.image = image_tower(config.text_width)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.modules = {"text": self.text, "projection": self.projection, "image": self.image}

    def parameters(self) -> list[Any]:
        return [p for m in self.modules.values() for p in m.parameters()] + [self.logit_scale]

    def state(self) -> dict[str, Any]:
        return {**{k: m.state_dict() for k, m in self.modules.items()}, "logit_scale": self.logit_scale.detach()}

    def load(self, state: dict[str, Any]) -> None:
        import torch

        for key, module in self.modules.items():
            module.load_state_dict(state[key])
        with torch.no_grad():
            self.logit_scale.copy_(state["logit_scale"])

    def train(self, mode: bool = True) -> None:
        for module in self.modules.values():
            module.train(mode)

    def embed_text(self, ids: Any) -> Any:
        pooled = self.text(ids).pooler_output  # the end token's final hidden state, as CLIP pools
        return _unit(self.projection(pooled))

    def embed_images(self, pixels: Any) -> Any:
        return _unit(self.image(pixels))


def _unit(x: Any) -> Any:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _pixels(images: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]


def _ids(tokenizer: Any, texts: list[str]) -> Any:
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def contrastive_loss(image_embeds: Any, text_embeds: Any, logit_scale: Any) -> Any:
    """CLIP's symmetric cross-entropy over the batch's image–text similarity matrix."""
    import torch
    import torch.nn.functional as F

    logits = logit_scale.exp().clamp(max=100) * image_embeds @ text_embeds.T
    target = torch.arange(len(logits))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# --- retrieval ---------------------------------------------------------------------------------


def retrieval_accuracy(similarity: np.ndarray, texts: list[str]) -> dict[str, float]:
    """Image → text top-1 over the held-out pairs: correct when the best text is the image's own report.

    Identical reports cannot be told apart, so retrieving a copy of the own text counts as correct; chance
    is therefore the mean share of held-out texts equal to the image's own (exactly what a random pick of
    one text per image scores on average), not 1/N.
    """
    texts_arr = np.array(texts, dtype=object)
    same = texts_arr[:, None] == texts_arr[None, :]
    best = similarity.argmax(axis=1)
    return {
        "pairs": len(texts),
        "distinct_texts": len(set(texts)),
        "image_to_text_top1": float(same[np.arange(len(texts)), best].mean()),
        "chance": float(same.mean(axis=1).mean()),
    }


def evaluate(towers: Towers, tokenizer: Any, pairs: Pairs, batch_size: int = 256) -> dict[str, float]:
    import torch

    towers.train(False)
    with torch.no_grad():
        images = torch.cat([towers.embed_images(_pixels(pairs.images[i : i + batch_size]))
                            for i in range(0, len(pairs.texts), batch_size)])  # fmt: skip
        texts = torch.cat([towers.embed_text(_ids(tokenizer, pairs.texts[i : i + batch_size]))
                           for i in range(0, len(pairs.texts), batch_size)])  # fmt: skip
    towers.train(True)
    return retrieval_accuracy((images @ texts.T).numpy(), pairs.texts)


# --- the run -----------------------------------------------------------------------------------


def _train(config: PretrainTextConfig, towers: Towers, tokenizer: Any, train: Pairs, out: Path) -> list[float]:
    """CLIP's contrastive loss on each step's batch of pairs, in the shared pretraining loop."""
    pixels, ids = _pixels(train.images), _ids(tokenizer, train.texts)

    def loss(step: int) -> Any:
        index = batch_index(len(train.texts), config.batch_size, config.seed, step)
        return contrastive_loss(towers.embed_images(pixels[index]), towers.embed_text(ids[index]), towers.logit_scale)

    return pretrain_loop(config, towers.parameters(), towers.state, towers.load, loss, out, STEP)


def pretrain_text(config: PretrainTextConfig) -> dict[str, Any]:
    """Pretrain, check retrieval on held-out patients, write `text_encoder/` + `tokenizer/` + the manifest."""
    import torch

    from cxrdiff.artifacts import input_identity
    from cxrdiff.model.tiny import clip_tokenizer

    check_ranges(config)
    if config.text_width % config.text_heads:
        raise InputError(f"--text-width {config.text_width}: not divisible by --text-heads {config.text_heads}")
    out = Path(config.out)
    from cxrdiff.data import find_table

    find_table(Path(config.data), "metadata")  # the data folder's own fault first
    ms_cxr = ms_cxr_file(config)
    folder = StepFolder.claim(
        out, STEP, settings(config, data=input_identity(config.data), ms_cxr=input_identity(ms_cxr))
    )
    if folder.finished:
        return _result(out, folder.manifest or {})
    tokenizer = clip_tokenizer()
    pairs = read_pairs(config.data, config.resolution, ms_cxr, config.max_pairs, config.text_fallback)
    train, held_out = split_held_out(pairs, config.held_out, config.seed)
    towers = Towers(config, tokenizer)
    before = evaluate(towers, tokenizer, held_out)
    with torch.enable_grad():
        losses = _train(config, towers, tokenizer, train, out)
    after = evaluate(towers, tokenizer, held_out)
    log.info(
        "retrieval on %d held-out pairs: top-1 %.3f (untrained %.3f, chance %.3f)",
        after["pairs"], after["image_to_text_top1"], before["image_to_text_top1"], after["chance"],
    )  # fmt: skip
    for part, save in (("text_encoder", towers.text.save_pretrained), ("tokenizer", tokenizer.save_pretrained)):
        with atomic_dir(out / part) as tmp:
            save(tmp)
    loss = write_losses(out, losses)
    extra = {
        "pairs": {"train": len(train.texts), "held_out": len(held_out.texts)},
        "retrieval": after,
        "retrieval_untrained": before,
        "loss": loss,
    }
    manifest = folder.finish(
        to_dict(config), inputs={"data": config.data, "ms_cxr": ms_cxr}, seed=config.seed,
        files=["text_encoder", "tokenizer", "losses.csv"], extra=extra,
    )  # fmt: skip
    (out / CHECKPOINT).unlink(missing_ok=True)
    return _result(out, manifest)


def _result(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    fields = {"retrieval_top1": "retrieval.image_to_text_top1", "chance": "retrieval.chance"}
    return pretrain_result(out, manifest, **fields, held_out_pairs="retrieval.pairs")
