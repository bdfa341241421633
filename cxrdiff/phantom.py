"""`cxrdiff phantom`: a synthetic MIMIC-CXR-shaped data set whose findings have a known, exact place.

MIMIC-CXR needs credentialed access, so the demo and the end-to-end tests need a stand-in with the same
files and quirks (JPG + some DICOM, the three CSVs, free-text reports with awkward sections, an MS-CXR box
table) and an honest answer for where each finding is. The pictures are drawn analytically in numpy
(lungs, heart, mediastinum, spine, ribs, clavicles, domes, soft tissue, noise) and each finding changes
the picture only where its mask says; the box is that mask's bounding box. Everything random comes from
seeds derived from `seed` and the image's position in the plan, so the same seed writes the same bytes.

Sides follow the radiograph convention: the patient's right is on the image's left.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.data import LABELS, MS_CXR_CATEGORIES, MS_CXR_FILE_COLUMNS, patient_folder
from cxrdiff.errors import InputError

SIDES = ("right", "left", "bilateral")
LOBES = ("upper", "lower")
# Which sides / lobes each finding can take (None: no side, or no lobe).
_SIDES: dict[str, tuple[str | None, ...]] = {
    "Atelectasis": ("right", "left", "bilateral"),
    "Cardiomegaly": (None,),
    "Consolidation": ("right", "left"),
    "Edema": ("bilateral",),
    "Lung Opacity": ("right", "left", "bilateral"),
    "Pleural Effusion": ("right", "left", "bilateral"),
    "Pneumonia": ("right", "left"),
    "Pneumothorax": ("right", "left"),
}
_LOBES: dict[str, tuple[str | None, ...]] = {
    "Atelectasis": ("lower",),
    "Consolidation": LOBES,
    "Lung Opacity": LOBES,
    "Pneumonia": LOBES,
}
# Severity 1..3 in words, per finding (index = severity - 1).
SEVERITY_WORDS: dict[str, tuple[str, str, str]] = {
    "Atelectasis": ("minimal", "mild", "moderate"),
    "Cardiomegaly": ("mild", "moderate", "severe"),
    "Consolidation": ("small", "focal", "extensive"),
    "Edema": ("mild", "moderate", "severe"),
    "Lung Opacity": ("subtle", "patchy", "dense"),
    "Pleural Effusion": ("small", "moderate", "large"),
    "Pneumonia": ("early", "focal", "extensive"),
    "Pneumothorax": ("small", "moderate", "large"),
}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One drawn finding: an MS-CXR category, where it is, how severe (1..3), and whether the text is sure."""

    category: str
    side: str | None = None
    lobe: str | None = None
    severity: int = 2
    certain: bool = True

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"severity_word": SEVERITY_WORDS[self.category][self.severity - 1]}


def sample_finding(rng: np.random.Generator, category: str) -> Finding:
    sides = _SIDES[category]
    lobes = _LOBES.get(category, (None,))
    side = sides[rng.integers(len(sides))]
    lobe = lobes[rng.integers(len(lobes))]
    if category == "Lung Opacity" and side == "bilateral":
        lobe = "lower"
    return Finding(category, side, lobe, int(rng.integers(1, 4)))


# --- anatomy ------------------------------------------------------------------------------------


def sample_anatomy(rng: np.random.Generator) -> dict[str, float]:
    """A patient's body, in units of the image's short side, relative to the thorax centre."""
    u = rng.uniform
    return {
        "scale": u(0.9, 1.04),
        "lung_x": 0.2 * u(0.96, 1.04),
        "lung_y": -0.03 + u(-0.01, 0.01),
        "lung_a": 0.17 * u(0.94, 1.06),
        "lung_b": 0.335 * u(0.95, 1.05),
        "dome_r": 0.215 + u(-0.015, 0.015),
        "dome_l": 0.245 + u(-0.015, 0.015),
        "heart_x": 0.045 + u(-0.01, 0.01),
        "heart_y": 0.12 + u(-0.01, 0.01),
        "heart_w": 0.145 * u(0.93, 1.05),
        "heart_h": 0.115 * u(0.94, 1.06),
        "med_w": 0.052 * u(0.9, 1.1),
        "rib_spacing": 0.068 * u(0.95, 1.05),
        "rib_phase": u(0.0, 1.0),
        "tissue": u(0.53, 0.6),
        "body_w": 0.45 * u(0.95, 1.05),
        "bubble": float(rng.random() < 0.6),
    }


def _soft(value, width: float):
    """A smooth step from 0 (value ≪ 0) to 1 (value ≫ 0) over about ±width."""
    return 0.5 + 0.5 * np.tanh(np.asarray(value, dtype=np.float32) / np.float32(width))


def _lowpass_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Smooth noise (std below 1) with features of about `cell` pixels: coarse normals, upsampled."""
    coarse = rng.standard_normal((max(2, height // cell + 2), max(2, width // cell + 2)), dtype=np.float32)
    return _upsample(coarse, width, height)


class _Canvas:
    """The coordinate grids of one picture, drawn on a coarser grid of (width, height) work pixels.

    Coordinates are in units of the body (`unit` output pixels) from `center` (output pixels); work pixel
    i sits at output position (i + 0.5) * out / work, which is where PIL's resize puts it, so the layers
    upsampled to the output size stay where they were computed.
    """

    def __init__(self, width: int, height: int, out: tuple[int, int], center: tuple[float, float], unit: float):
        self.width, self.height, self.unit = width, height, unit
        sx, sy = out[0] / width, out[1] / height
        self.X = (((np.arange(width, dtype=np.float32) + 0.5) * sx - center[0]) / unit)[None, :]  # (1, w)
        self.Y = (((np.arange(height, dtype=np.float32) + 0.5) * sy - center[1]) / unit)[:, None]  # (h, 1)
        self.edge = 1.0 * max(sx, sy, 1.5) / unit  # a soft edge of one or two output pixels


def _lung(cv: _Canvas, g: dict[str, float], sign: int, inspiration: float = 1.0) -> tuple[np.ndarray, dict]:
    """One lung field (0..1): an ellipse cut by the diaphragm dome below; sign -1 = right lung (image left)."""
    lx, ly, a, b = sign * g["lung_x"], g["lung_y"], g["lung_a"], g["lung_b"] * inspiration
    dome_top = (g["dome_r"] if sign < 0 else g["dome_l"]) * inspiration
    r = np.sqrt(((cv.X - lx) / a) ** 2 + ((cv.Y - ly) / b) ** 2)  # (H, W)
    dome = dome_top + 2.2 * (cv.X - lx + sign * 0.02) ** 2  # (1, W): highest near the lung centre
    field = _soft(1.0 - r, cv.edge / a * 2) * _soft(dome - cv.Y, cv.edge * 2)
    return field, {"x": lx, "y": ly, "a": a, "b": b, "dome_top": dome_top, "dome": dome}


def _ellipse(cv: _Canvas, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0, edge: float | None = None):
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = cv.X - cx, cv.Y - cy
    u, v = (dx * c + dy * s) / ax, (-dx * s + dy * c) / ay
    return _soft(1.0 - np.sqrt(u * u + v * v), (edge or cv.edge) / min(ax, ay))


def _blob(cv: _Canvas, rng: np.random.Generator, cx: float, cy: float, radius: float, parts: int, spread: float):
    """An irregular patch: the sum of a few Gaussians scattered around (cx, cy); peak about 1."""
    field = np.zeros((cv.height, cv.width), np.float32)
    for _ in range(parts):
        ox, oy = rng.normal(0.0, spread, 2)
        rx, ry = radius * rng.uniform(0.7, 1.2), radius * rng.uniform(0.7, 1.2)
        field += np.exp(-(((cv.X - cx - ox) / rx) ** 2) - ((cv.Y - cy - oy) / ry) ** 2)
    return field / max(float(field.max()), 1e-6)


# --- findings -------------------------------------------------------------------------------------


def _lobe_centre(lung: dict, lobe: str | None, sign: int) -> tuple[float, float]:
    if lobe == "upper":
        return lung["x"] + sign * 0.02, lung["y"] - 0.42 * lung["b"]
    return lung["x"] + sign * 0.03, lung["dome_top"] - 0.1


def _compose(state: dict) -> np.ndarray:
    """The picture's density from its layers: tissue and bone, minus the air left, plus the vessels in it."""
    air = np.clip(state["air"], 0, 1)
    return state["density"] - 0.42 * state["air"] + (state["markings"] + 0.06 * state["ribs"]) * air


def _draw_finding(cv: _Canvas, state: dict, finding: Finding, rng: np.random.Generator) -> list[np.ndarray]:
    """Edit the layers for one finding; return the change of the composed picture on each side drawn."""
    cat, sev = finding.category, finding.severity
    signs = {"right": (-1,), "left": (1,), "bilateral": (-1, 1), None: ()}[finding.side]
    deltas = []
    for sign in signs:
        before = _compose(state)
        lung, info = state["lungs"][sign]
        if cat == "Pleural Effusion":
            depth = (0.08, 0.14, 0.22)[sev - 1] * info["b"] / 0.335
            lateral = np.clip(sign * (cv.X - info["x"]) / info["a"], 0.0, 1.0)  # (1, W)
            level = info["dome_top"] - depth - 0.07 * lateral**2  # meniscus: higher at the chest wall
            fluid = _soft(cv.Y - level, cv.edge * 4) * lung  # (H, W)
            state["air"] = state["air"] * (1 - fluid)
        elif cat == "Pneumothorax":
            k = (0.22, 0.32, 0.44)[sev - 1]
            sx, sy = info["x"] - sign * k * 0.5 * info["a"], info["y"] + k * 0.7 * info["b"]
            ax, ay = info["a"] * (1 - k * 0.5), info["b"] * (1 - k * 0.7)
            collapsed = _ellipse(cv, sx, sy, ax, ay)
            rim = np.clip(lung - collapsed, 0.0, 1.0)  # lucent: air without vessels
            pleura = _ellipse(cv, sx, sy, ax + 1.5 * cv.edge, ay + 1.5 * cv.edge) - collapsed
            pleura = pleura * lung * _soft(info["y"] + 0.25 * info["b"] - cv.Y + 0.1 * k, 0.03)  # the visceral line
            state["markings"] = state["markings"] * (1 - rim)
            state["air"] = state["air"] + 0.22 * rim * lung
            state["density"] = state["density"] + 0.12 * pleura
        elif cat == "Edema":
            hx, hy = info["x"] - sign * 0.05, info["y"] + 0.05
            rx, ry = (0.11, 0.135, 0.16)[sev - 1], (0.12, 0.15, 0.18)[sev - 1]
            haze = np.exp(-(((cv.X - hx) / rx) ** 2) - ((cv.Y - hy) / ry) ** 2) * (0.75 + 0.25 * state["mottle"])
            patch = np.clip(haze * 1.2, 0, 1) * lung
            state["air"] = state["air"] * (1 - (0.5, 0.6, 0.7)[sev - 1] * patch)
            state["density"] = state["density"] + 0.03 * patch
        else:  # a patch in a lobe: consolidation, pneumonia, opacity; a band at the base: atelectasis
            cx, cy = _lobe_centre(info, finding.lobe, sign)
            if cat == "Atelectasis":
                thick = (0.022, 0.03, 0.04)[sev - 1]
                centre = info["dome_top"] - 0.06 - thick + rng.uniform(-0.15, 0.15) * (cv.X - cx) * sign  # (1, W)
                along = np.exp(-(((cv.X - cx) / (0.75 * info["a"])) ** 4))
                patch, strength = _soft(thick - np.abs(cv.Y - centre), cv.edge * 2) * along, 0.9
            elif cat == "Lung Opacity":
                radius = (0.065, 0.08, 0.095)[sev - 1]
                patch, strength = np.clip(_blob(cv, rng, cx, cy, radius, 3, 0.025) * 1.3, 0, 1) ** 1.5, 0.6
            else:
                radius = (0.055, 0.07, 0.085)[sev - 1]
                field = _blob(cv, rng, cx, cy, radius, 5 if cat == "Pneumonia" else 4, 0.03)
                patch = _soft(field - 0.35, 0.08 if cat == "Pneumonia" else 0.05)
                patch = patch * np.clip((0.8 if cat == "Pneumonia" else 0.9) + 0.2 * state["mottle"], 0, 1)
                strength = 0.92
            patch = patch * lung
            state["air"] = state["air"] * (1 - strength * patch)
            state["density"] = state["density"] + 0.03 * patch
        deltas.append(_compose(state) - before)
    return deltas


def _mask_of(delta: np.ndarray, relative: float = 0.1) -> np.ndarray:
    """Where a finding changed the picture: |change| above a fraction of its own peak."""
    magnitude = np.abs(delta)
    return magnitude > max(relative * float(magnitude.max()), 0.01)


def mask_box(mask: np.ndarray, margin: int = 0) -> list[int] | None:
    """The (x, y, w, h) integer box that covers a boolean mask (rows y..y+h, cols x..x+w), with a margin."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    height, width = mask.shape
    x0, y0 = max(int(cols[0]) - margin, 0), max(int(rows[0]) - margin, 0)
    x1, y1 = min(int(cols[-1]) + 1 + margin, width), min(int(rows[-1]) + 1 + margin, height)
    return [x0, y0, x1 - x0, y1 - y0]


# --- the picture -------------------------------------------------------------------------------------


def render(
    rng: np.random.Generator,
    width: int,
    height: int | None = None,
    findings: Sequence[Finding] = (),
    anatomy: dict[str, float] | None = None,
    view: str = "PA",
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, list[list[int]]]]:
    """A radiograph in [0, 1] (H, W) float32, the mask of each finding and its boxes (one per side drawn).

    The random draws happen in a fixed order (anatomy, image jitter, noise, then the findings), so the same
    generator state without a finding gives the same picture except where that finding was drawn.
    """
    height = height or width
    g = anatomy if anatomy is not None else sample_anatomy(rng)
    if view == "LATERAL":
        return _render_lateral(rng, width, height, g), {}, {}
    unit = min(width, height) / g["scale"]
    center = (width / 2 + rng.normal(0, 0.02) * width, height / 2 + rng.normal(0.02, 0.015) * height)
    factor = max(1, round(min(width, height) / 320))  # smooth layers on a coarser grid: 4x fewer pixels at 512
    cv = _Canvas(-(-width // factor), -(-height // factor), (width, height), center, unit)
    inspiration = rng.uniform(0.95, 1.03) * (0.97 if view == "AP" else 1.0)
    contrast, offset, gamma = rng.uniform(1.2, 1.45), rng.uniform(-0.06, -0.02), rng.uniform(0.85, 1.15)
    noise = rng.standard_normal((height, width), dtype=np.float32) * rng.uniform(0.008, 0.016)
    markings_noise = _lowpass_noise(rng, cv.height, cv.width, max(2, cv.width // 45))
    mottle = _lowpass_noise(rng, cv.height, cv.width, max(2, cv.width // 25))
    X, Y = cv.X, cv.Y

    # Soft tissue: a trunk that narrows to the neck, thicker in the middle.
    neck = 0.13 + (g["body_w"] - 0.13) * _soft(Y + 0.42, 0.05)  # (H, 1)
    body = _soft(neck - np.abs(X), cv.edge * 3)  # (H, W)
    tissue = body * (g["tissue"] + 0.1 * (1 - np.clip((X / g["body_w"]) ** 2, 0, 1)))
    tissue = tissue + 0.06 * body * _soft(Y - 0.25, 0.05)  # the abdomen below the domes

    # Heart (enlarged by cardiomegaly), mediastinum and aortic knob.
    cardio = next((f for f in findings if f.category == "Cardiomegaly"), None)
    enlarge = 1.0 if cardio is None else (1.25, 1.38, 1.52)[cardio.severity - 1]
    ap = 1.05 if view == "AP" else 1.0
    hw, hh = g["heart_w"] * enlarge * ap, g["heart_h"] * (1 + (enlarge - 1) * 0.45) * ap
    heart = _ellipse(cv, g["heart_x"] + (enlarge - 1) * 0.05, g["heart_y"], hw, hh, -0.35)
    mediastinum = _soft(g["med_w"] + 0.015 * _soft(Y - 0.0, 0.08) - np.abs(X - 0.008), cv.edge * 3)
    mediastinum = np.maximum(mediastinum * _soft(0.3 - Y, 0.02), _ellipse(cv, 0.055, -0.165, 0.04, 0.035))

    lungs = {sign: _lung(cv, g, sign, inspiration) for sign in (-1, 1)}
    lung_field = lungs[-1][0] + lungs[1][0]
    air = lung_field * (1 - heart) * (1 - mediastinum)
    if g["bubble"]:
        bubble = _ellipse(cv, 0.2, lungs[1][1]["dome_top"] + 0.06, 0.05, 0.03) * body
        air = air + 0.5 * bubble

    # Lung markings: vessels from the hila, fading towards the periphery.
    hila = sum(np.exp(-(((X - s * 0.09) / 0.12) ** 2) - ((Y - 0.0) / 0.16) ** 2) for s in (-1, 1))
    markings = (0.03 + 0.05 * hila) * (1 + 0.6 * markings_noise) * lung_field
    markings = np.clip(markings, 0, None) + 0.09 * sum(
        np.exp(-(((X - s * 0.085) / 0.035) ** 2) - ((Y - 0.0) / 0.06) ** 2) for s in (-1, 1)
    )

    # Bones: spine, posterior ribs over the thorax, clavicles.
    spine = _soft(0.032 - np.abs(X - 0.005), cv.edge * 2) * (0.85 + 0.15 * np.cos(2 * np.pi * Y / 0.055))
    thorax = _soft(0.36 - np.abs(X), 0.03) * _soft(Y + 0.38, 0.02) * _soft(0.27 - Y, 0.04)
    rib_y = Y + 0.9 * np.abs(X) - 2.5 * X**2  # rise laterally, then fall: the ribs' arc
    phase = (np.clip(rib_y + 0.5, 0, None) ** 1.08) / g["rib_spacing"] + g["rib_phase"]
    ribs = np.clip((np.cos(2 * np.pi * phase) - 0.25) / 0.75, 0, 1) ** 0.6 * thorax * _soft(np.abs(X) - 0.03, 0.01)
    d = np.abs(X) - 0.04  # clavicles: from the sternum outwards and up, symmetric
    centre = -0.36 - 0.25 * d + 1.1 * np.clip(d, 0, None) ** 2
    clavicles = _soft(0.016 - np.abs(Y - centre), cv.edge * 2) * _soft(d, 0.01) * _soft(0.3 - d, 0.02)
    density = tissue + 0.06 * spine + 0.025 * ribs + 0.15 * clavicles
    state = {
        "density": density.astype(np.float32),
        "air": air.astype(np.float32),
        "markings": markings.astype(np.float32),
        "ribs": ribs.astype(np.float32),
        "lungs": lungs,
        "mottle": mottle,
    }

    masks: dict[str, np.ndarray] = {}
    boxes: dict[str, list[list[int]]] = {}
    margin = max(1, round(0.01 * min(width, height)))
    for finding in findings:
        if finding.category == "Cardiomegaly":
            masks["Cardiomegaly"] = _upsample(heart, width, height) > 0.5
            boxes["Cardiomegaly"] = [mask_box(masks["Cardiomegaly"], margin)]
            continue
        deltas = _draw_finding(cv, state, finding, rng)
        side_masks = [_mask_of(_upsample(d, width, height)) for d in deltas]
        masks[finding.category] = np.logical_or.reduce(side_masks)
        boxes[finding.category] = [b for b in (mask_box(m, margin) for m in side_masks) if b is not None]

    picture = _upsample(_compose(state), width, height) + noise
    picture = np.clip(picture * contrast + offset, 0.0, 1.0) ** gamma
    _marker(picture, width, height)
    return picture.astype(np.float32), masks, boxes


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of linear interpolation with pixel centres aligned (as PIL and torch's
    align_corners=False); edges clamp."""
    pos = np.clip((np.arange(n_out, dtype=np.float32) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, (pos - low).astype(np.float32)


def _upsample(layer: np.ndarray, width: int, height: int) -> np.ndarray:
    """A work-grid layer at the output size, linearly interpolated; numpy because PIL's float images copy
    through Python bytes, which cost more than the drawing."""
    if layer.shape == (height, width):
        return layer
    r0, r1, ry = _linear_weights(layer.shape[0], height)
    c0, c1, cx = _linear_weights(layer.shape[1], width)
    rows = layer[r0] * (1 - ry)[:, None] + layer[r1] * ry[:, None]  # (height, w)
    return rows[:, c0] * (1 - cx) + rows[:, c1] * cx  # (height, width)


def _marker(picture: np.ndarray, width: int, height: int) -> None:
    """A lead 'L' marker in the top right corner (the patient's left): radiographs carry one, and it
    makes every picture span black to white, as the min-max scaled MIMIC-CXR JPGs do."""
    s = max(3, min(width, height) // 32)
    x0, y0 = width - 3 * s, s
    picture[y0 : y0 + 2 * s, x0 : x0 + max(1, s // 2)] = 1.0
    picture[y0 + 2 * s - max(1, s // 2) : y0 + 2 * s, x0 : x0 + s + 1] = 1.0


def _render_lateral(rng: np.random.Generator, width: int, height: int, g: dict[str, float]) -> np.ndarray:
    """A lateral view (front to the image's left): one lung field, spine behind, heart in front."""
    unit = min(width, height) / g["scale"]
    factor = max(1, round(min(width, height) / 320))
    center = (width / 2 + rng.normal(0, 0.02) * width, height / 2 + 0.02 * height)
    cv = _Canvas(-(-width // factor), -(-height // factor), (width, height), center, unit)
    X, Y = cv.X, cv.Y
    body = _ellipse(cv, 0.0, 0.05, 0.42, 0.62, edge=3 * cv.edge)
    lung = _ellipse(cv, 0.02, -0.02, 0.28, 0.34) * _soft(0.22 + 0.6 * (X - 0.05) ** 2 - Y, 2 * cv.edge)
    heart = _ellipse(cv, -0.13, 0.13, 0.14, 0.12, 0.3)
    spine = _soft(0.045 - np.abs(X - 0.33 - 0.05 * Y), 2 * cv.edge) * (0.85 + 0.15 * np.cos(2 * np.pi * Y / 0.06))
    density = body * g["tissue"] + 0.12 * spine - 0.38 * lung * (1 - heart)
    density = _upsample(density, width, height) + rng.standard_normal((height, width), dtype=np.float32) * 0.012
    picture = np.clip(density * rng.uniform(1.25, 1.45) - 0.03, 0, 1)
    _marker(picture, width, height)
    return picture.astype(np.float32)


def to_uint8(picture: np.ndarray) -> np.ndarray:
    return np.round(np.clip(picture, 0, 1) * 255.0).astype(np.uint8)


def render_study(
    rng: np.random.Generator,
    size: int,
    findings: Sequence[Finding] = (),
    anatomy: dict[str, float] | None = None,
    view: str = "PA",
    height: int | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A frontal radiograph as uint8 (H, W) and the boolean mask of what each finding changed."""
    picture, masks, _ = render(rng, size, height, findings, anatomy, view)
    return to_uint8(picture), masks


# --- report text --------------------------------------------------------------------------------------

NO_FINDING_IMPRESSIONS = (
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary process.",
    "No acute intrathoracic process.",
    "No acute cardiopulmonary abnormality.",
    "No evidence of acute cardiopulmonary disease.",
    "Normal chest radiograph.",
)
SHORT_IMPRESSIONS = ("Normal.", "Clear.", "No PTX.", "___.", "Stable.")
_NEGATIONS: dict[str, tuple[str, ...]] = {
    "Pleural Effusion": ("No pleural effusion.", "No pleural effusions."),
    "Pneumothorax": ("No pneumothorax.", "There is no pneumothorax."),
    "Consolidation": ("No focal consolidation.",),
    "Edema": ("No pulmonary edema.", "No evidence of pulmonary edema."),
    "Cardiomegaly": ("Heart size is normal.", "No cardiomegaly."),
}
_HEDGES = ("Possible {}.", "{} cannot be excluded.", "Findings may represent {}.")
_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}


def label_text(finding: Finding, variant: int = 0) -> str:
    """A short MS-CXR-style phrase for a finding ('small left pleural effusion', 'cardiomegaly')."""
    sev = SEVERITY_WORDS[finding.category][finding.severity - 1]
    side, lobe = finding.side, finding.lobe
    where = f"{side} {lobe} lobe" if side != "bilateral" else f"bilateral {lobe} lobe"
    options = {
        "Cardiomegaly": ("cardiomegaly", f"{sev} cardiomegaly", "enlarged cardiac silhouette"),
        "Pleural Effusion": (
            (f"{sev} bilateral pleural effusions", "bilateral pleural effusions")
            if side == "bilateral"
            else (f"{sev} {side} pleural effusion", f"{side} pleural effusion")
        ),
        "Pneumothorax": (f"{sev} {side} apical pneumothorax", f"{side} pneumothorax", f"{sev} {side} pneumothorax"),
        "Consolidation": (f"{where} consolidation", f"consolidation in the {where}"),
        "Pneumonia": (f"{where} pneumonia", f"pneumonia in the {where}"),
        "Lung Opacity": (
            ("bibasilar opacities", "bilateral lower lobe opacities")
            if side == "bilateral"
            else (f"{where} opacity", f"{sev} {where} opacity")
            + ((f"{side} basilar opacity",) if lobe == "lower" else ())
        ),
        "Edema": (f"{sev} pulmonary edema", "pulmonary edema", f"{sev} interstitial edema"),
        "Atelectasis": (
            ("bibasilar atelectasis", f"{sev} bibasilar atelectasis")
            if side == "bilateral"
            else (f"{side} basilar atelectasis", f"{sev} {side} basilar atelectasis", f"{side} lower lobe atelectasis")
        ),
    }[finding.category]
    return options[variant % len(options)]


def _sentence(phrase: str) -> str:
    return phrase[0].upper() + phrase[1:] + "."


def _finding_sentence(finding: Finding, rng: np.random.Generator, phrase: str) -> str:
    """The impression's sentence for a finding: the phrase, hedged when the finding is uncertain."""
    if not finding.certain:
        return _HEDGES[rng.integers(len(_HEDGES))].format(phrase).capitalize()
    if finding.category == "Cardiomegaly" and rng.random() < 0.3:
        sev = SEVERITY_WORDS["Cardiomegaly"][finding.severity - 1]
        return f"The heart is {_ADVERB[sev]} enlarged, consistent with cardiomegaly."
    if finding.category == "Pleural Effusion" and finding.side != "bilateral" and rng.random() < 0.3:
        return f"There is a {phrase}."
    return _sentence(phrase)


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, width=77, initial_indent=" ", subsequent_indent=" ") or [" "]


def _labels_for(findings: Sequence[Finding], negated: Sequence[str]) -> dict[str, float]:
    """CheXpert labels as the labeler reads the text: 1 stated, -1 hedged, 0 negated, else blank."""
    labels = {name: float("nan") for name in LABELS}
    for name in negated:
        labels[name] = 0.0
    for f in findings:
        labels[f.category] = 1.0 if f.certain else -1.0
    pathology = [n for n in LABELS if n not in ("No Finding", "Support Devices")]
    if not any(labels[n] in (1.0, -1.0) for n in pathology):
        labels["No Finding"] = 1.0
    return labels


def write_report_text(
    rng: np.random.Generator,
    findings: Sequence[Finding],
    phrases: Sequence[str],
    view: str,
    case: str,
    extra_blank: bool,
) -> tuple[str, dict[str, float]]:
    """A MIMIC-style report and the CheXpert labels of the section a labeler reads (impression, else findings).

    `case` is one of standard | no_impression | short_impression | conclusion_heading.
    """
    present = {f.category for f in findings}
    sentences = [_finding_sentence(f, rng, p) for f, p in zip(findings, phrases, strict=True)]
    absent = [c for c in _NEGATIONS if c not in present]
    negated = [c for c in absent if rng.random() < 0.25]
    if findings:
        impression_parts = sentences + [_NEGATIONS[c][rng.integers(len(_NEGATIONS[c]))] for c in negated]
        if len(sentences) > 1 and rng.random() < 0.4:
            impression = "\n".join(f"{i}. {s}" for i, s in enumerate(impression_parts, 1))
        else:
            impression = "  ".join(impression_parts)
    else:
        impression = NO_FINDING_IMPRESSIONS[rng.integers(len(NO_FINDING_IMPRESSIONS))]
        if negated and rng.random() < 0.5:
            impression += "  " + "  ".join(_NEGATIONS[c][0] for c in negated)
        else:
            negated = []
    if case == "short_impression":
        impression, negated = SHORT_IMPRESSIONS[rng.integers(len(SHORT_IMPRESSIONS))], []

    # FINDINGS: the same findings in other words, plus the normal statements.
    body = []
    heart = "Cardiomegaly" in present
    body.append(
        next(s for f, s in zip(findings, sentences, strict=True) if f.category == "Cardiomegaly")
        if heart
        else ("Heart size is normal." if rng.random() < 0.5 else "The cardiomediastinal silhouette is normal.")
    )
    body += [s for f, s in zip(findings, sentences, strict=True) if f.category != "Cardiomegaly"]
    pleura = [c for c in ("Pleural Effusion", "Pneumothorax") if c not in present]
    if pleura:
        body.append("There is no " + " or ".join(c.lower() for c in pleura) + ".")
    if not findings:
        body.insert(1, "The lungs are clear without focal consolidation.")
    if rng.random() < 0.4:
        body.append("No acute osseous abnormalities are seen.")
    findings_labels = _labels_for(
        findings, [*pleura, *(["Cardiomegaly"] if not heart else []), *(["Consolidation"] if not findings else [])]
    )
    impression_labels = _labels_for(findings if case != "short_impression" else [], negated)

    exam = "CHEST (PA AND LAT)" if view == "PA" else "CHEST (PORTABLE AP)"
    indication = ("cough", "shortness of breath", "fever", "chest pain", "hypoxia", "evaluate for pneumonia")
    sex = ("man", "woman")[int(rng.integers(2))]
    lines = [
        "                                 FINAL REPORT",
        f" EXAMINATION:  {exam}",
        " ",
        f" INDICATION:  ___-year-old {sex} with {indication[rng.integers(len(indication))]}.",
        " ",
        f" TECHNIQUE:  Chest {'PA and lateral' if view == 'PA' else 'portable AP'}",
        " ",
        f" COMPARISON:  {('None.', '___.', 'Chest radiograph from ___.')[rng.integers(3)]}",
        " ",
        " FINDINGS: ",
        " ",
        *_wrap("  ".join(body)),
    ]
    if case != "no_impression":
        heading = "CONCLUSION:" if case == "conclusion_heading" else "IMPRESSION:"
        lines += [" ", f" {heading} ", " "]
        for paragraph in impression.split("\n"):
            lines += _wrap(paragraph)
        if "Pneumothorax" in present and rng.random() < 0.5:
            lines += _wrap("Findings were discussed with Dr. ___ by ___ at ___ on ___.")
    if extra_blank:
        spaced = []
        for line in lines:
            spaced.append(line)
            if line.strip().endswith(":"):
                spaced += [" ", ""]
        lines = spaced + ["", ""]
    labels = findings_labels if case == "no_impression" else impression_labels
    return "\n".join(lines) + "\n", labels


# --- the data set -------------------------------------------------------------------------------------

FOLDERS = (19, 10, 11, 12, 13, 14, 15, 16, 17, 18)  # round robin from p19, so p19 exists and holds ~10%
REPORT_CASES = ("standard", "no_impression", "short_impression", "conclusion_heading")
MS_CXR_FILE = "MS_CXR_Local_Alignment_v1.0.0.csv"
TRUTH_FILE = "phantom_truth.json"
METADATA_COLUMNS_FULL = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
_FINDING_STUDIES = 0.6  # share of frontal studies with at least one finding
_UNCERTAIN = 0.12  # share of findings whose text hedges (CheXpert -1.0)
_MS_CXR_SHARE = 0.3  # share of eligible (certain, outside p19) images per category that get boxes


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, 5))


def _plan(patients: int, seed: int, size: int, dicom_fraction: float) -> tuple[list[dict], np.random.Generator]:
    """Every study and image, decided up front from one generator (the pictures get seeds of their own)."""
    rng = np.random.default_rng(seed)
    suffixes = rng.choice(10**6, patients, replace=False)
    n_studies = rng.integers(1, 5, patients)
    study_ids = 50_000_000 + rng.choice(10**7, int(n_studies.sum()), replace=False)
    studies, k = [], 0
    for p in range(patients):
        subject = FOLDERS[p % len(FOLDERS)] * 10**6 + int(suffixes[p])
        split = ("validate", "test", "train")[int(np.searchsorted([0.02, 0.04], rng.random(), side="right"))]
        date = int(rng.integers(2110, 2200)) * 10000 + int(rng.integers(1, 13)) * 100 + int(rng.integers(1, 29))
        for s in range(int(n_studies[p])):
            study = int(study_ids[k])
            k += 1
            view = "PA" if rng.random() < 0.6 else "AP"
            findings: list[Finding] = []
            if rng.random() < _FINDING_STUDIES:
                count = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
                for c in sorted(rng.choice(len(MS_CXR_CATEGORIES), count, replace=False)):
                    f = sample_finding(rng, MS_CXR_CATEGORIES[c])
                    certain = f.category == "Cardiomegaly" or rng.random() >= _UNCERTAIN
                    findings.append(dataclasses.replace(f, certain=certain))
            weights = [0.86, 0.07, 0.0, 0.07] if findings else [0.8, 0.05, 0.08, 0.07]
            case = REPORT_CASES[int(rng.choice(len(REPORT_CASES), p=weights))]
            phrases = [label_text(f, int(rng.integers(3))) for f in findings]
            extra_blank = bool(rng.random() < 0.1)
            text, labels = write_report_text(rng, findings, phrases, view, case, extra_blank)
            views = [view] + [view] * int(rng.random() < 0.05) + ["LATERAL"] * int(rng.random() < 0.35)
            images = []
            for i, v in enumerate(views):
                height = int(round(size * (1.0, 1.125, 1.25)[rng.integers(3)]))
                dicom = None
                if rng.random() < dicom_fraction:
                    dicom = {
                        "photometric": "MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2",
                        "bits": 12 if rng.random() < 0.6 else 16,
                        "low": int(rng.integers(0, 300)),
                    }
                images.append(
                    {
                        "dicom_id": _dicom_id(rng),
                        "view": v,
                        "width": size,
                        "height": height,
                        "dicom": dicom,
                        "image_seed": [seed, p, s, i],
                        "anatomy_seed": [seed, p],
                    }
                )
            studies.append(
                {
                    "subject_id": subject,
                    "study_id": study,
                    "split": split,
                    "date": date + s,  # consecutive days (de-identified dates are shifted, not real)
                    "time": _study_time(rng),
                    "view": view,
                    "findings": findings,
                    "phrases": phrases,
                    "case": case,
                    "extra_blank": extra_blank,
                    "report": text,
                    "labels": labels,
                    "images": images,
                }
            )
    return studies, rng


def _study_time(rng: np.random.Generator) -> float:
    """MIMIC's StudyTime: HHMMSS.fff as a number."""
    ms = int(rng.integers(0, 86_400_000))
    hours, minutes, seconds = ms // 3_600_000, ms // 60_000 % 60, ms // 1000 % 60
    return round(hours * 10000 + minutes * 100 + seconds + (ms % 1000) / 1000, 3)


def _relative(study: dict, image: dict | None = None, suffix: str = ".jpg") -> str:
    subject, sid = study["subject_id"], study["study_id"]
    base = f"files/{patient_folder(subject)}/p{subject}"
    return f"{base}/s{sid}.txt" if image is None else f"{base}/s{sid}/{image['dicom_id']}{suffix}"


def _render_task(task: dict) -> tuple[np.ndarray, dict[str, list[list[int]]]]:
    anatomy = sample_anatomy(np.random.default_rng(task["anatomy_seed"]))
    findings = [Finding(**f) for f in task["findings"]] if task["view"] != "LATERAL" else []
    picture, _, boxes = render(
        np.random.default_rng(task["image_seed"]), task["width"], task["height"], findings, anatomy, task["view"]
    )
    return picture, boxes


def rerender(entry: dict) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, list[list[int]]]]:
    """Draw an image of the phantom again from its `phantom_truth.json` entry: (uint8, masks, boxes)."""
    anatomy = sample_anatomy(np.random.default_rng(entry["anatomy_seed"]))
    findings = [
        Finding(**{k: f[k] for k in ("category", "side", "lobe", "severity", "certain")}) for f in entry["findings"]
    ]
    picture, masks, boxes = render(
        np.random.default_rng(entry["image_seed"]), entry["width"], entry["height"], findings, anatomy, entry["view"]
    )
    return to_uint8(picture), masks, boxes


def _write_dicom(path: Path, picture: np.ndarray, task: dict) -> None:
    """The picture as a DX DICOM with a window that maps the stored range onto black..white, so that the
    shared reader (modality LUT, window, MONOCHROME1 inverted, min-max) gives back the JPG's grey levels."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    spec = task["dicom"]
    top = 2 ** spec["bits"] - 1
    low = spec["low"]
    high = top - spec["low"] if spec["bits"] == 16 else top - 2 * spec["low"]
    values = np.clip(picture, 0, 1).astype(np.float64)
    if spec["photometric"] == "MONOCHROME1":
        values = 1.0 - values
    stored = np.round(low + values * (high - low)).astype("<u2")  # (H, W)
    digits = int(task["dicom_id"].replace("-", "")[:32], 16)
    sop = f"2.25.{digits}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop
    ds.StudyInstanceUID = f"2.25.{task['study_id'] * 10**6 + task['subject_id'] % 10**6}"
    ds.SeriesInstanceUID = f"2.25.{digits // 7}"
    ds.Modality, ds.PatientID, ds.PatientName = "DX", str(task["subject_id"]), "___"
    ds.StudyID, ds.StudyDate, ds.StudyTime = str(task["study_id"]), str(task["date"]), f"{task['time']:010.3f}"
    ds.ViewPosition = task["view"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, spec["photometric"]
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, spec["bits"], spec["bits"] - 1, 0
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    ds.WindowCenter = f"{(low + high) / 2 + 0.5:g}"
    ds.WindowWidth = f"{high - low + 1:g}"
    ds.PixelData = stored.tobytes()
    from cxrdiff.artifacts import atomic_path

    with atomic_path(path) as tmp:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)


def _image_worker(args: tuple[str, dict]) -> tuple[str, dict[str, list[list[int]]]]:
    """Render one image and write its JPG (and DICOM) unless already there; return its boxes."""
    from PIL import Image

    from cxrdiff.artifacts import atomic_path

    root, task = args
    picture, boxes = _render_task(task)
    jpg = Path(root) / task["path"]
    if not jpg.is_file():
        with atomic_path(jpg) as tmp:
            Image.fromarray(to_uint8(picture)).save(tmp, format="JPEG", quality=95)
    if task["dicom"] is not None and not (Path(root) / task["dicom_path"]).is_file():
        _write_dicom(Path(root) / task["dicom_path"], picture, task)
    return task["dicom_id"], boxes


def _csv_gz(frame) -> bytes:
    """A CSV, gzipped with mtime 0 and no file name in the header, so the same table gives the same bytes."""
    return gzip.compress(frame.to_csv(index=False, lineterminator="\n").encode(), compresslevel=6, mtime=0)


def make_phantom(
    out: str | os.PathLike,
    patients: int = 100,
    seed: int = 0,
    size: int = 512,
    dicom_fraction: float = 0.1,
    preview: bool = False,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write the phantom MIMIC-CXR tree to `out`; return its paths and counts.

    A re-run with the same settings into a finished folder returns at once; into a folder a killed run
    left behind, it keeps the images already written (they are the same bytes) and writes the rest.
    """
    import pandas as pd

    from cxrdiff.artifacts import MANIFEST, write_bytes, write_json, write_manifest, write_text
    from cxrdiff.console import log, progress

    out = Path(out)
    if patients < 1:
        raise InputError(f"--patients: must be at least 1, got {patients}")
    if size < 32:
        raise InputError(f"--size: must be at least 32 pixels, got {size}")
    if not 0.0 <= dicom_fraction <= 1.0:
        raise InputError(f"--dicom-fraction: must be between 0 and 1, got {dicom_fraction}")
    config = {
        "out": os.fspath(out),
        "patients": patients,
        "seed": seed,
        "size": size,
        "dicom_fraction": dicom_fraction,
        "preview": preview,
    }
    settings = {k: v for k, v in config.items() if k != "out"}
    plan_file = out / ".phantom-settings.json"
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("step") != "phantom":
            raise InputError(f"{out}: is a '{manifest.get('step')}' folder; give a new folder for the phantom")
        if {k: manifest["config"].get(k) for k in settings} == settings:
            log.info("%s: phantom already complete with these settings", out)
            return _result(out, manifest["counts"])
        raise InputError(f"{out}: holds a phantom made with other settings; give a new folder or delete it")
    unfinished = plan_file.is_file() and json.loads(plan_file.read_text()) == settings
    if out.is_dir() and any(out.iterdir()) and not unfinished:
        raise InputError(f"{out}: folder is not empty and is not an unfinished phantom; give a new folder")
    write_json(plan_file, settings)

    studies, rng = _plan(patients, seed, size, dicom_fraction)
    tasks = []
    for study in studies:
        write_text(out / _relative(study), study["report"])
        for image in study["images"]:
            tasks.append(
                image
                | {
                    "path": _relative(study, image),
                    "dicom_path": _relative(study, image, ".dcm") if image["dicom"] else None,
                    "findings": [dataclasses.asdict(f) for f in study["findings"]],
                    "subject_id": study["subject_id"],
                    "study_id": study["study_id"],
                    "date": study["date"],
                    "time": study["time"],
                }
            )
    boxes = dict(_run_images(out, tasks, workers, progress))

    # Tables, as the real files have them.
    procedure = {"PA": "CHEST (PA AND LAT)", "AP": "CHEST (PORTABLE AP)"}
    view_meaning = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}
    metadata, split, chexpert = [], [], []
    for study in studies:
        chexpert.append({"subject_id": study["subject_id"], "study_id": study["study_id"], **study["labels"]})
        for image in study["images"]:
            metadata.append(
                {
                    "dicom_id": image["dicom_id"],
                    "subject_id": study["subject_id"],
                    "study_id": study["study_id"],
                    "PerformedProcedureStepDescription": procedure[study["view"]],
                    "ViewPosition": image["view"],
                    "Rows": image["height"],
                    "Columns": image["width"],
                    "StudyDate": study["date"],
                    "StudyTime": study["time"],
                    "ProcedureCodeSequence_CodeMeaning": procedure[study["view"]],
                    "ViewCodeSequence_CodeMeaning": view_meaning[image["view"]],
                    "PatientOrientationCodeSequence_CodeMeaning": "Erect" if study["view"] == "PA" else "Recumbent",
                }
            )
            split.append(
                {
                    k: image["dicom_id"] if k == "dicom_id" else study[k]
                    for k in ("dicom_id", "study_id", "subject_id", "split")
                }
            )
    metadata_frame = pd.DataFrame(metadata, columns=list(METADATA_COLUMNS_FULL))
    write_bytes(out / "mimic-cxr-2.0.0-metadata.csv.gz", _csv_gz(metadata_frame))
    write_bytes(out / "mimic-cxr-2.0.0-split.csv.gz", _csv_gz(pd.DataFrame(split)))
    chexpert_frame = pd.DataFrame(chexpert, columns=["subject_id", "study_id", *LABELS])
    write_bytes(out / "mimic-cxr-2.0.0-chexpert.csv.gz", _csv_gz(chexpert_frame))

    # MS-CXR: a share of the certain findings' first frontal images outside p19, one row per box.
    truth: dict[str, Any] = {}
    eligible: dict[str, list[tuple[dict, dict, int]]] = {c: [] for c in MS_CXR_CATEGORIES}
    for study in studies:
        frontal = [im for im in study["images"] if im["view"] != "LATERAL"]
        for image in frontal:
            truth[image["dicom_id"]] = {
                "subject_id": study["subject_id"],
                "study_id": study["study_id"],
                "path": _relative(study, image),
                **{k: image[k] for k in ("view", "width", "height", "image_seed", "anatomy_seed")},
                "findings": [
                    f.as_dict() | {"label_text": phrase, "boxes": boxes[image["dicom_id"]].get(f.category, [])}
                    for f, phrase in zip(study["findings"], study["phrases"], strict=True)
                ],
            }
        if patient_folder(study["subject_id"]) == "p19":
            continue
        for n, f in enumerate(study["findings"]):
            if f.certain and boxes[frontal[0]["dicom_id"]].get(f.category):
                eligible[f.category].append((study, frontal[0], n))
    rows = []
    for category in MS_CXR_CATEGORIES:
        candidates = eligible[category]
        if not candidates:
            continue
        take = max(1, round(_MS_CXR_SHARE * len(candidates)))
        for index in sorted(rng.choice(len(candidates), take, replace=False)):
            study, image, n = candidates[index]
            for x, y, w, h in boxes[image["dicom_id"]][category]:
                rows.append(
                    {
                        "dicom_id": image["dicom_id"],
                        "category_name": category,
                        "label_text": study["phrases"][n],
                        "path": _relative(study, image),
                        "x": x,
                        "y": y,
                        "w": w,
                        "h": h,
                        "image_width": image["width"],
                        "image_height": image["height"],
                    }
                )
    ms_cxr = pd.DataFrame(rows, columns=list(MS_CXR_FILE_COLUMNS))
    write_text(out / MS_CXR_FILE, ms_cxr.to_csv(index=False, lineterminator="\n"))
    write_json(
        out / TRUTH_FILE, {"description": "frontal images only; boxes are (x, y, w, h) in pixels", "images": truth}
    )
    if preview:
        write_preview(out, out / "preview.png")

    counts = _counts(studies, ms_cxr, chexpert_frame)
    write_manifest(out, "phantom", config=config, seed=seed, extra={"counts": counts, "truth": TRUTH_FILE})
    plan_file.unlink(missing_ok=True)
    return _result(out, counts)


def _run_images(out: Path, tasks: list[dict], workers: int | None, progress) -> list:
    """Render and write every image, in worker processes when there are enough images to pay for them."""
    jobs = [(os.fspath(out), task) for task in tasks]
    if workers is None:  # a pool pays for its start-up from about a hundred images on
        workers = min(os.cpu_count() or 1, 8) if len(jobs) >= 64 else 1
    if workers <= 1:
        return [_image_worker(job) for job in progress(jobs, description="phantom images")]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        return list(
            progress(pool.map(_image_worker, jobs, chunksize=16), total=len(jobs), description="phantom images")
        )


def _counts(studies: list[dict], ms_cxr, chexpert) -> dict[str, Any]:
    """What the generator put in, for the prepare step's tests to compare their filters against."""
    images = Counter(im["view"] for s in studies for im in s["images"])
    dicoms = Counter(im["dicom"]["photometric"] for s in studies for im in s["images"] if im["dicom"])
    cases = Counter(s["case"] for s in studies)
    return {
        "patients": len({s["subject_id"] for s in studies}),
        "studies": len(studies),
        "studies_p19": sum(patient_folder(s["subject_id"]) == "p19" for s in studies),
        "images": {v: images.get(v, 0) for v in ("PA", "AP", "LATERAL")},
        "images_total": sum(images.values()),
        "dicom": {p: dicoms.get(p, 0) for p in ("MONOCHROME1", "MONOCHROME2")},
        "reports": {
            "no_impression": cases.get("no_impression", 0),
            "short_impression": cases.get("short_impression", 0),
            "conclusion_heading": cases.get("conclusion_heading", 0),
            "extra_blank_lines": sum(s["extra_blank"] for s in studies),
        },
        "no_finding_studies": int((chexpert["No Finding"] == 1.0).sum()),
        "studies_with_findings": sum(bool(s["findings"]) for s in studies),
        "label_positive": {name: int((chexpert[name] == 1.0).sum()) for name in LABELS},
        "label_uncertain": {name: int((chexpert[name] == -1.0).sum()) for name in LABELS},
        "label_negative": {name: int((chexpert[name] == 0.0).sum()) for name in LABELS},
        "ms_cxr": {
            "rows": {c: int((ms_cxr["category_name"] == c).sum()) for c in MS_CXR_CATEGORIES},
            "images": {
                c: int(ms_cxr.loc[ms_cxr["category_name"] == c, "dicom_id"].nunique()) for c in MS_CXR_CATEGORIES
            },
            "images_total": int(ms_cxr["dicom_id"].nunique()),
        },
    }


def _result(out: Path, counts: dict[str, Any]) -> dict[str, Any]:
    result = {
        "out": os.fspath(out),
        "metadata": os.fspath(out / "mimic-cxr-2.0.0-metadata.csv.gz"),
        "split": os.fspath(out / "mimic-cxr-2.0.0-split.csv.gz"),
        "chexpert": os.fspath(out / "mimic-cxr-2.0.0-chexpert.csv.gz"),
        "ms_cxr": os.fspath(out / MS_CXR_FILE),
        "truth": os.fspath(out / TRUTH_FILE),
        "patients": counts["patients"],
        "studies": counts["studies"],
        "images": counts["images_total"],
        "ms_cxr_rows": sum(counts["ms_cxr"]["rows"].values()),
        "counts": counts,
    }
    if (out / "preview.png").is_file():
        result["preview"] = os.fspath(out / "preview.png")
    return result


def write_preview(root: str | os.PathLike, path: str | os.PathLike, tile: int = 256) -> Path:
    """A contact sheet: one MS-CXR image per category read back from disk, with its boxes from the CSV."""
    import pandas as pd
    from PIL import Image, ImageDraw

    from cxrdiff.artifacts import atomic_path

    root = Path(root)
    frame = pd.read_csv(root / MS_CXR_FILE, dtype={"dicom_id": str})
    cells = []
    for category in MS_CXR_CATEGORIES:
        rows = frame[frame["category_name"] == category]
        if rows.empty:
            continue
        first = rows[rows["dicom_id"] == rows["dicom_id"].iloc[0]]
        with Image.open(root / first["path"].iloc[0]) as img:
            picture = img.convert("RGB")
        draw = ImageDraw.Draw(picture)
        for row in first.itertuples():
            draw.rectangle([row.x, row.y, row.x + row.w - 1, row.y + row.h - 1], outline=(255, 40, 40), width=2)
        scale = tile / picture.width
        picture = picture.resize((tile, round(picture.height * scale)), Image.BILINEAR)
        cells.append((picture, f"{category}: {first['label_text'].iloc[0]}"))
    columns = 4
    height = max((c[0].height for c in cells), default=tile) + 14
    sheet = Image.new("RGB", (columns * tile, max(1, -(-len(cells) // columns)) * height), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for i, (picture, caption) in enumerate(cells):
        x, y = (i % columns) * tile, (i // columns) * height
        sheet.paste(picture, (x, y + 14))
        draw.text((x + 2, y + 1), caption[:48], fill=(120, 255, 120))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)
