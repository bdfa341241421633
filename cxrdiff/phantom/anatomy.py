"""The phantom's pictures: anatomy drawn in numpy, and findings that change it only inside their exact masks.

Each finding's mask is where it changed the composed picture; its box is that mask's bounding box (one per
side drawn). The random draws happen in a fixed order, so the same generator state draws the same picture.
Sides follow the radiograph convention: the patient's right is on the image's left.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

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


def picture_to_uint8(picture: np.ndarray) -> np.ndarray:
    """A rendered picture (float, 0 = black, 1 = white) → 8-bit grey, as the JPGs store it."""
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
    return picture_to_uint8(picture), masks
