"""From a token's map to scores: normalise, take it to the scoring frame (prepared or original), the regions
(a mask format's mask, or the boxes as one union or each on its own), and the localization metrics."""

from __future__ import annotations

from typing import Any

import numpy as np

from cxrdiff.errors import InputError
from cxrdiff.ground.config import GroundConfig, GroundingInput
from cxrdiff.ground.tokens import choose_tokens, ids_at, word_positions
from cxrdiff.metrics.laterality import SIDES, laterality


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
    if config.boxes in ("union", "per-phrase"):  # the sample's boxes: see `mscxr.union_boxes`
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


def phrase_laterality(sample: GroundingInput, heat: np.ndarray, frame_size: int) -> float:
    """The share of the normalised map's mass on the side of the patient the phrase names, in the prepared frame
    (its midline is the image's: the crop is centred), whatever `--frame` scores in; NaN for no single side."""
    if sample.side not in SIDES:
        return float("nan")
    return laterality(to_frame(normalise(heat), frame_size), sample.side)


def score_chunk(
    chunk: list[GroundingInput], maps: np.ndarray, config: GroundConfig, tokenizer: Any, frame_size: int, run: int
) -> dict[str, Any]:
    """Heatmaps, score rows, word-analysis rows and skip notes for one batch."""
    heatmaps, rows, word_rows, skipped = {}, [], [], []
    for s, token_maps in zip(chunk, maps, strict=True):
        positions, source = choose_tokens(tokenizer, s, config.word)
        heat = token_maps[positions].mean(axis=0)  # (H, W)
        heatmaps[s.sample] = heat
        sided = {"side": s.side, "laterality": phrase_laterality(s, heat, frame_size)}
        if config.image is not None:
            rows.append({"sample": s.sample, "phrase": s.phrase, "tokens": positions, "token_source": source, **sided})
            continue
        frame_map = scoring_maps(s, heat, frame_size, config.frame)
        base = {
            "run": run,
            "sample": s.sample,
            "dicom_id": s.dicom_id,
            "category": s.category,
            "phrase": s.phrase,
            "tokens": positions,
            "token_text": " ".join(tokenizer.convert_ids_to_tokens(ids_at(tokenizer, s.phrase, positions))),
            "token_source": source,
            **sided,
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
