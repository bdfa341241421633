"""Which classes the report's per-class tables and figures show: those of the data's grounding set (MS-CXR's 8
for MIMIC-CXR, NIH ChestX-ray14's box findings for NIH, a CSV's categories), the paper's classes first in its
order. The paper's published cells exist only for MS-CXR's classes; `class_note` says so where the set differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cxrdiff.data import MS_CXR_CATEGORIES


def shown_classes(metrics: Mapping[str, Any]) -> list[str]:
    """The grounding set's classes (`data_set.grounding_classes`, recorded by the report from ms_cxr.parquet),
    MS-CXR's in the paper's order, then the others by name; MS-CXR's 8 when none are recorded."""
    recorded = (metrics.get("data_set") or {}).get("grounding_classes")
    if not recorded:
        return list(MS_CXR_CATEGORIES)
    return [c for c in MS_CXR_CATEGORIES if c in recorded] + sorted(c for c in recorded if c not in MS_CXR_CATEGORIES)


def grounding_set_name(metrics: Mapping[str, Any]) -> str:
    """MS-CXR for a MIMIC-layout folder; a public set's own name (`data_set.format` is recorded for those)."""
    data = metrics.get("data_set") or {}
    return f"{data['name']} boxes" if data.get("format") and data.get("name") else "MS-CXR"


def class_note(metrics: Mapping[str, Any]) -> str:
    """A note (with its leading space; "" for MS-CXR's 8) for the per-class tables: which classes are the
    paper's (the others have no published cell) and which of the set's names are shown under the paper's."""
    classes = shown_classes(metrics)
    if classes == list(MS_CXR_CATEGORIES):
        return ""
    data = metrics.get("data_set") or {}
    own = [c for c in classes if c not in MS_CXR_CATEGORIES]
    note = f" Classes: those of the grounding set ({grounding_set_name(metrics)})"
    note += f"; {', '.join(own)} are not MS-CXR classes, so the paper has no cell for them (—)" if own else ""
    note += "; the paper's Average is over MS-CXR's 8 classes, this report's over the classes shown."
    renamed = {a: b for a, b in (data.get("category_names") or {}).items() if b in classes}
    if renamed:
        names = ", ".join(f'"{a}" is shown as the paper\'s "{b}"' for a, b in renamed.items())
        note += f" {data.get('name', 'The set')}'s {names}."
    return note
