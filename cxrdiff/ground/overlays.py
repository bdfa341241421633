"""The paper's Figure 2 per sample (`overlay`: the image, its heatmap, its boxes), and `--image`'s overlay at
the image's own size (`image_overlay`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import atomic_path
from cxrdiff.errors import InputError
from cxrdiff.figures import bounded_scale
from cxrdiff.ground.config import GroundConfig, GroundingInput
from cxrdiff.ground.score import normalise, to_frame, to_original


def write_overlays(out: Path, config: GroundConfig, chunk: list[GroundingInput], heatmaps: dict[str, np.ndarray],
                   latents: Any, comps: Any, frame_size: int) -> None:  # fmt: skip
    """overlays/<sample>.png for a batch: the single image drawn at its own size, prepared rows in their frame."""
    if config.image is not None:
        with atomic_path(out / "overlays" / f"{chunk[0].sample}.png") as tmp:
            tmp.write_bytes(image_overlay(config, next(iter(heatmaps.values())), frame_size))
        return
    data_dir = Path(config.data).parent if config.data is not None else None
    for s, heat, latent in zip(chunk, heatmaps.values(), latents, strict=True):
        grey = grey_image(s, comps, latent, data_dir, frame_size)
        with atomic_path(out / "overlays" / f"{s.sample}.png") as tmp:
            overlay(grey, heat, s.boxes).save(tmp, format="PNG")


def overlay(grey: np.ndarray, heat: np.ndarray, boxes: list[list[float]], alpha: float = 0.45):
    """The paper's Figure 2: the image in grey, the normalised heatmap in colour over it, boxes in red."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    size = grey.shape[0]
    colour = colormaps["jet"](to_frame(normalise(heat), size))[..., :3] * 255.0  # (size, size, 3)
    base = np.repeat(grey[..., None].astype(np.float32), 3, axis=-1)  # (size, size, 3)
    image = Image.fromarray(np.round((1 - alpha) * base + alpha * colour).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for x, y, w, h in boxes:
        draw.rectangle([x, y, x + w, y + h], outline=(255, 0, 0), width=max(1, size // 256))
    return image


MIN_OVERLAY = 256  # pixels on the short side of a single image's overlay, at the least


def image_overlay(config: GroundConfig, heat: np.ndarray, frame_size: int, alpha: float = 0.45) -> bytes:
    """`--image`'s overlay as PNG bytes: the image at its own size (the map taken back through prepare's resize
    and crop; what the crop cut away shows 0), the phrase and the grounded words as its title, a colour bar.
    The model's frame (64 px for the demo's model) is too small to read; an image under `MIN_OVERLAY` pixels
    on its short side is enlarged by a whole factor, so each of its pixels stays a square; a long image is drawn
    smaller, so that the figure's longest side stays within `figures.MAX_FIGURE_PIXELS`."""
    import io

    from matplotlib.figure import Figure

    from cxrdiff.images import load_grayscale

    grey = load_grayscale(Path(str(config.image)))  # (H, W)
    height, width = grey.shape
    heat_map = to_original(to_frame(normalise(heat), frame_size), width, height)  # (H, W) in [0, 1]
    dpi, factor = 100, -(-MIN_OVERLAY // min(height, width))  # the factor: 1 for an image of MIN_OVERLAY px or more
    scale = bounded_scale(width, height, factor)
    figure = Figure(figsize=(width * scale / dpi, height * scale / dpi), dpi=dpi)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))  # the image fills the figure: `scale` pixels per pixel
    drawing = "nearest" if scale >= 1 else "antialiased"
    axes.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation=drawing)
    shown = axes.imshow(heat_map, cmap="jet", vmin=0.0, vmax=1.0, alpha=alpha, interpolation=drawing)
    axes.set_axis_off()
    words = ", ".join(config.word) if config.word else "every word"
    axes.set_title(f"{config.prompt}\ncross-attention on: {words}", fontsize=10)
    bar = figure.colorbar(shown, cax=figure.add_axes((1.02, 0.0, 0.03, 1.0)))
    bar.set_label("attention, normalised", fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)  # the title and bar outside
    return buffer.getvalue()


def grey_image(sample: GroundingInput, comps: Any, latent: Any, data_dir: Path | None, size: int) -> np.ndarray:
    """The image in the prepared frame: from its file when it can be found, else decoded from the latent."""
    import torch

    from cxrdiff.images import grey_from_vae, load_grayscale, resize_center_crop

    for candidate in (Path(sample.image_path), (data_dir or Path()) / sample.image_path):
        if sample.image_path and candidate.is_file():
            try:
                return resize_center_crop(load_grayscale(candidate), size)
            except InputError:
                break
    with torch.no_grad():
        decoded = comps.vae.decode(latent[None] / comps.scaling_factor).sample  # (1, 3, size, size)
    return grey_from_vae(decoded)[0]
