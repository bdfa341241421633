"""The privacy section's figures: the closest pairs (generated | nearest training image), since a person
judges a copy by looking, and the copy rate over training."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.figures import bounded_dpi
from cxrdiff.report.privacy.tables import measured_runs


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=bounded_dpi(fig, 110), bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _grey(path: str, size: int | None = None) -> np.ndarray | None:
    """The image, in the square frame of `size` px when given (a training image as it was compared)."""
    from cxrdiff.images import load_grayscale, resize_center_crop

    if not Path(path).is_file():
        return None
    grey = load_grayscale(path)
    return grey if size is None or grey.shape == (size, size) else resize_center_crop(grey, size)


def pairs_figure(metrics: Mapping[str, Any]) -> tuple[bytes, str] | None:
    """Per run and measure, a row of the closest pairs: generated | nearest training image, their similarity
    above, red when it counts as a copy."""
    rows = []
    for name, p in measured_runs(metrics).items():
        for key, rate_key in (("features", "copy_rate"), ("pixels", "copy_rate_pixels")):
            pairs = (p.get("pairs") or {}).get(key)
            if pairs:
                rows.append((f"{name}\n{p[rate_key]['measure']}", pairs))
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(pairs) for _, pairs in rows)
    fig, axes = plt.subplots(len(rows), 2 * columns, figsize=(1.3 * 2 * columns, 1.6 * len(rows)), squeeze=False)
    for i, (label, pairs) in enumerate(rows):
        for j in range(columns):
            for side, key in ((0, "generated"), (1, "training")):
                ax = axes[i][2 * j + side]
                ax.set_xticks([])
                ax.set_yticks([])
                if j >= len(pairs):
                    ax.axis("off")
                    continue
                pair = pairs[j]
                generated = _grey(pair["generated"])
                grey = generated if side == 0 else _grey(pair[key], None if generated is None else generated.shape[0])
                if grey is not None:
                    ax.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                colour = "red" if pair["copy"] else "black"
                for spine in ax.spines.values():
                    spine.set_color(colour)
                    spine.set_linewidth(2 if pair["copy"] else 0.5)
                if side == 0:
                    ax.set_title(
                        f"{pair['similarity']:.3f}" + (" copy" if pair["copy"] else ""),
                        fontsize=7,
                        color=colour,
                        loc="left",
                    )
                else:
                    ax.set_title("nearest training", fontsize=6, color="grey", loc="right")
        axes[i][0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    caption = (
        "The closest pairs of each run: generated image | its nearest training image (in the frame it was compared "
        "in), most similar first, per measure (features: cosine; pixels: Pearson correlation); red and marked 'copy' "
        "above the calibrated threshold."
    )
    return _png(fig), caption


def over_training_figure(metrics: Mapping[str, Any]) -> tuple[bytes, str] | None:
    """The copy rate against training steps (Wilson intervals) and against CNR along training, one line per run:
    the accuracy–interpretability–privacy front over training."""
    curves = {
        n: [p for p in r.get("checkpoints") or [] if p.get("copy_rate")] for n, r in metrics.get("runs", {}).items()
    }
    curves = {n: ps for n, ps in curves.items() if ps}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    nominal = None
    for name, points in curves.items():
        steps = [p["step"] for p in points]
        rates = np.array([100 * p["copy_rate"]["rate"] for p in points])
        low = rates - np.array([100 * p["copy_rate"]["low"] for p in points])
        high = np.array([100 * p["copy_rate"]["high"] for p in points]) - rates
        left.errorbar(steps, rates, yerr=[low, high], marker="o", capsize=3, label=name)
        nominal = 100 * points[0]["copy_rate"]["nominal"]
        cnr = [((p.get("grounding") or {}).get("cnr") or {}).get("mean") for p in points]
        if all(c is not None for c in cnr):
            right.plot(cnr, rates, marker="o", label=name)
            right.annotate(
                f"{steps[-1]:,}", (cnr[-1], rates[-1]), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
    if nominal is not None:
        for ax in (left, right):
            ax.axhline(nominal, color="grey", linestyle=":", linewidth=1, label="no copying (nominal)")
    measure = next(iter(curves.values()))[0]["copy_rate"]["measure"]
    left.set(xlabel="training step", ylabel="copy rate %", title=f"privacy over training ({measure})")
    right.set(xlabel="CNR (average)", ylabel="copy rate %", title="interpretability against privacy")
    left.legend(fontsize=7)
    caption = (
        "Copy rate of each run's kept checkpoints against training steps (95 % Wilson intervals) and against their "
        "average CNR (the last step labelled): frozen and learnable text encoders on one figure; the dotted line is "
        "the rate a model that copies nothing gives."
    )
    return _png(fig), caption


def privacy_figures(metrics: Mapping[str, Any]) -> dict[str, tuple[bytes, str]]:
    """The privacy section's figures that have something to show (file stem → (PNG, caption))."""
    made = {"privacy-pairs": pairs_figure(metrics), "privacy-over-training": over_training_figure(metrics)}
    return {name: fig for name, fig in made.items() if fig is not None}
