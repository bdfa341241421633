"""The data set's vocabulary and the on-disk form of latents, shared by every step.

Latents are stored in Parquet as raw little-endian float16 bytes plus their shape: compact, exact,
and readable with nothing but numpy (`latent_from_bytes`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# CheXpert's 14 labels, in the column order of mimic-cxr-2.0.0-chexpert.csv.
LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

# MS-CXR's 8 categories, in the paper's table order.
MS_CXR_CATEGORIES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Lung Opacity",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
)

# The words whose tokens ground each category (the paper's code, matched by substring).
CLASS_WORDS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis", "atelectatic"),
    "Cardiomegaly": ("cardiomegaly", "cardiac"),
    "Consolidation": ("consolidation", "consolidations", "consolidative"),
    "Edema": ("edema",),
    "Lung Opacity": ("opacity", "opacities", "opacification"),
    "Pleural Effusion": ("pleural", "effusion", "effusions"),
    "Pneumonia": ("pneumonia",),
    "Pneumothorax": ("pneumothorax", "pneumothoraces"),
}

VIEWS_KEPT: tuple[str, ...] = ("PA", "AP")
TEST_PATIENT_FOLDER = "p19"


def latent_to_bytes(latent: np.ndarray) -> bytes:
    """A latent (C, H, W) as little-endian float16 bytes, C order."""
    return np.ascontiguousarray(latent, dtype="<f2").tobytes()


def latent_from_bytes(data: bytes, shape: Sequence[int]) -> np.ndarray:
    """Inverse of `latent_to_bytes` (float32 out, for arithmetic)."""
    return np.frombuffer(data, dtype="<f2").reshape(tuple(int(s) for s in shape)).astype(np.float32)


def patient_folder(subject_id: int) -> str:
    """MIMIC's top folder: the first two digits of the subject id, e.g. 19012345 → 'p19'."""
    return f"p{str(int(subject_id))[:2]}"
