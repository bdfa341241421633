"""The size bound every PNG figure obeys: a figure scaled by its inputs (an image's own size, a grid of runs by
classes) would otherwise grow without limit (a 1 × 3,000 px image made a 337 × 768,066 px overlay)."""

from __future__ import annotations

from typing import Any

MAX_FIGURE_PIXELS = 4096  # the longest side of a figure's drawing area, in pixels (titles and colour bars outside)


def bounded_dpi(figure: Any, dpi: float) -> float:
    """`dpi`, lowered where needed so that the matplotlib figure's longest side stays within MAX_FIGURE_PIXELS."""
    longest = max(figure.get_size_inches())
    return min(float(dpi), MAX_FIGURE_PIXELS / longest) if longest > 0 else float(dpi)


def bounded_scale(width: int, height: int, scale: float) -> float:
    """A picture of `width` × `height` pixels drawn `scale` times: the scale, lowered where needed so that its
    longest side stays within MAX_FIGURE_PIXELS."""
    return min(float(scale), MAX_FIGURE_PIXELS / max(width, height, 1))
