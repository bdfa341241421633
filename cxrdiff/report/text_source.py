"""Table 7 measured: a run's CNR on the MS-CXR phrases that contain their image's label.

The paper compares models trained on impressions, on class labels and on synthetic impressions, scoring each
"only on the phrases that contain the label, to enable a fair comparison": a model trained on labels has
only ever seen the class names. A phrase contains its label when the class name, lower-cased, occurs in the
lower-cased phrase ('Small left pleural effusions' contains 'pleural effusion'; 'enlarged cardiac
silhouette' does not contain 'cardiomegaly', and is left out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def label_in_phrase(phrase: str, category: str) -> bool:
    """Whether the phrase names its class: the class name as a case-insensitive substring."""
    return category.lower() in str(phrase).lower()


def text_source_cnr(scores: Any) -> dict[str, Any]:
    """Mean CNR over the scored rows (all grounding runs) whose phrase contains its class name; `n` of
    `n_all` phrases (counted in the first run) kept. `cnr` is None when no phrase contains its label."""
    first = scores[scores["run"] == scores["run"].min()] if "run" in scores else scores
    keep = [label_in_phrase(p, c) for p, c in zip(scores["phrase"], scores["category"], strict=True)]
    kept = scores[keep]
    n = sum(label_in_phrase(p, c) for p, c in zip(first["phrase"], first["category"], strict=True))
    cnr = float(kept["cnr"].mean()) if len(kept) else None
    return {"cnr": cnr, "n": int(n), "n_all": int(len(first))}


def text_source_of(ground_dir: Path, source: str | None) -> dict[str, Any]:
    """A ground folder's Table 7 entry for a run trained on `source` (empty without a scores table)."""
    import pandas as pd

    path = Path(ground_dir) / "scores.parquet"
    if not path.is_file():
        return {}
    scores = pd.read_parquet(path, columns=None)
    if not {"phrase", "category", "cnr"} <= set(scores.columns):
        return {}
    return {"source": source, **text_source_cnr(scores)}


TEXT_SOURCE_NAMES = {"impression": "impressions", "labels": "class labels"}


def source_name(source: str | None) -> str:
    """What a run was trained on, in words (impressions, class labels, synthetic impressions (FILE))."""
    if source and source.startswith("file:"):
        return f"synthetic impressions ({Path(source[5:]).name})"
    return TEXT_SOURCE_NAMES.get(source or "", str(source))
