"""Reading radiographs and putting them in the model's frame, the same way for every step.

The paper's transform: resize the shorter side to the resolution (bilinear), centre-crop to a square,
scale to [-1, 1], repeat to 3 channels; never flip (laterality is in the text). Boxes and masks go
through the same resize and crop so they stay on the finding.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from cxrdiff.errors import InputError


def load_grayscale(path: str | os.PathLike) -> np.ndarray:
    """An image file (JPG/PNG, or DICOM) as an 8-bit grey array (H, W)."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return load_dicom(path)
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("L"))
    except FileNotFoundError:
        raise InputError(f"{path}: image not found") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: unreadable image ({exc})") from None


def load_dicom(path: str | os.PathLike) -> np.ndarray:
    """A DICOM radiograph as 8-bit grey, the way MIMIC-CXR-JPG was made from the DICOMs:
    modality LUT, then the VOI LUT or window, MONOCHROME1 inverted, min-max scaled to 0..255."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except FileNotFoundError:
        raise InputError(f"{path}: DICOM file not found") from None
    except Exception as exc:  # pydicom raises many types for truncated/invalid files
        raise InputError(f"{path}: unreadable DICOM ({type(exc).__name__}: {exc})") from None
    values = apply_modality_lut(pixels, ds)
    values = apply_voi_lut(values, ds).astype(np.float64)
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        values = values.max() - values
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) / (high - low) * 255.0).astype(np.uint8)


def crop_geometry(width: int, height: int, resolution: int) -> tuple[float, float, float]:
    """(scale, left, top): resize by `scale` so the short side is `resolution`, then crop at (left, top)."""
    scale = resolution / min(width, height)
    new_w, new_h = round(width * scale), round(height * scale)
    return scale, (new_w - resolution) // 2, (new_h - resolution) // 2


def resize_center_crop(image: np.ndarray, resolution: int) -> np.ndarray:
    """Shorter side to `resolution` (bilinear), centre-crop to `resolution`²; uint8 in, uint8 out."""
    height, width = image.shape[:2]
    scale, left, top = crop_geometry(width, height, resolution)
    resized = Image.fromarray(image).resize((round(width * scale), round(height * scale)), Image.BILINEAR)
    return np.asarray(resized)[top : top + resolution, left : left + resolution]


def box_to_frame(box: tuple[float, float, float, float], width: int, height: int, resolution: int) -> list[float]:
    """An (x, y, w, h) box in original pixels → the prepared frame, clipped to it."""
    scale, left, top = crop_geometry(width, height, resolution)
    x0, y0 = box[0] * scale - left, box[1] * scale - top
    x1, y1 = (box[0] + box[2]) * scale - left, (box[1] + box[3]) * scale - top
    x0, y0 = min(max(x0, 0.0), resolution), min(max(y0, 0.0), resolution)
    x1, y1 = min(max(x1, 0.0), resolution), min(max(y1, 0.0), resolution)
    return [x0, y0, x1 - x0, y1 - y0]


def boxes_mask(boxes, size: int | tuple[int, int]) -> np.ndarray:
    """A boolean (H, W) mask that is the union of (x, y, w, h) boxes, filled as rows y..y+h, cols x..x+w."""
    height, width = (size, size) if isinstance(size, int) else size
    mask = np.zeros((height, width), dtype=bool)
    for x, y, w, h in boxes:
        r0, c0 = max(int(np.floor(y)), 0), max(int(np.floor(x)), 0)
        r1, c1 = min(int(np.ceil(y + h)), height), min(int(np.ceil(x + w)), width)
        mask[r0:r1, c0:c1] = True
    return mask


def to_model_input(images: np.ndarray):
    """uint8 (B, H, W) or (H, W) → float tensor (B, 3, H, W) in [-1, 1] for the VAE."""
    import torch

    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    tensor = torch.from_numpy(array / 127.5 - 1.0)  # (batch, height, width)
    return tensor[:, None].repeat(1, 3, 1, 1)  # (batch, 3, height, width)


def grey_from_vae(images) -> np.ndarray:
    """Decoded VAE output (B, 3, H, W) in [-1, 1] → uint8 grey (B, H, W), channels averaged."""
    array = images.detach().float().cpu().clamp(-1, 1).mean(dim=1).numpy()
    return np.round((array + 1.0) * 127.5).astype(np.uint8)


def grey_from_pipeline(images) -> np.ndarray:
    """Pipeline output (B, 3, H, W) in [0, 1] → uint8 grey (B, H, W): the mean over RGB, rounded."""
    array = images.detach().float().cpu().clamp(0, 1).mean(dim=1).numpy()  # (batch, height, width)
    return np.round(array * 255.0).astype(np.uint8)
