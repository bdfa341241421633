"""`cxrdiff prepare --format openi`: the IU X-ray (Open-i) PNG release with the reports torchxrayvision ships.

Each report (`NLMCXR_reports.tgz`, one XML per study) names its images (`parentImage`); its FINDINGS and
IMPRESSION sections are handed to the MIMIC parser (`cxrdiff.impressions.extract_impression`), so the prompt
is the impression as for MIMIC (`--text-fallback` as there). Frontal views are those whose `View Position` in
the shipped DICOM metadata is PA or AP; an image of another or no recorded view is skipped, with its view.
The set has no boxes: no grounding set (said in the log and the manifest). Images are found under --images
by the release's names (`CXR<report>_IM-<series>-<number>.png`).
"""

from __future__ import annotations

import re
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from cxrdiff.data import LABELS, VIEWS_KEPT
from cxrdiff.errors import InputError
from cxrdiff.impressions import MIN_IMPRESSION_CHARS, SOURCES, extract_impression
from cxrdiff.prepare.config import PrepareConfig, text_fallbacks
from cxrdiff.prepare.encode import skipped_row
from cxrdiff.prepare.nih import shipped_table
from cxrdiff.prepare.public import ROW_COLUMNS, Candidates, PublicFormat, PublicInputs, image_index, read_keyed_table

REPORTS_FILE = "NLMCXR_reports.tgz"
METADATA_TABLE = "nlmcxr_dicom_metadata.csv.gz"
METADATA_COLUMNS = ("imageid", "View Position")
REPORT_NUMBER_IN_ID = re.compile(r"^(CXR\d+)_\d+_(IM-)")  # a report's "CXR1_1_IM-..." is the metadata's "CXR1_IM-..."
SECTIONS = ("FINDINGS", "IMPRESSION")  # the sections the parser reads (COMPARISON and INDICATION are not prompts)


def openi_tables(config: PrepareConfig) -> dict[str, Path | None]:
    return {
        "table": config.table or shipped_table(METADATA_TABLE),
        "reports": config.reports or shipped_table(REPORTS_FILE),
    }


def read_reports(path: Path) -> dict[str, tuple[int, str]]:
    """image id → (report number, the report as "FINDINGS: ...\\n\\nIMPRESSION: ..." text) from the XML archive."""
    found: dict[str, tuple[int, str]] = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if not member.isfile() or not member.name.endswith(".xml"):
                    continue
                root = ET.parse(archive.extractfile(member)).getroot()
                number = int(Path(member.name).stem)
                parts = []
                for node in root.iter("AbstractText"):
                    label = str(node.get("Label", "")).upper()
                    if label in SECTIONS and (node.text or "").strip():
                        parts.append(f"{label}: {node.text.strip()}")
                for image in root.iter("parentImage"):
                    found[str(image.get("id"))] = (number, "\n\n".join(parts))
    except (OSError, tarfile.TarError, ET.ParseError, ValueError) as exc:
        raise InputError(f"{path}: not a readable Open-i report archive ({type(exc).__name__}: {exc})") from None
    return found


def read_openi(config: PrepareConfig, inputs: PublicInputs) -> Candidates:
    """The frontal images under --images with a usable impression; the others in skipped.csv with why."""
    import pandas as pd

    table = inputs.tables["table"]
    skipped: list[dict[str, Any]] = []
    views, _ = read_keyed_table(table, METADATA_COLUMNS, "imageid", skipped)
    views = views.set_index("imageid")
    reports = read_reports(inputs.tables["reports"])
    files = {Path(name).stem: path for name, path in image_index(inputs.images).items()}
    fallbacks = text_fallbacks(config.text_fallback)
    counts: dict[str, Any] = {
        "reports_images": len(reports),
        "metadata_images": len(views),
        "images_in_folder": len(files),
    }
    reasons: dict[str, int] = {}
    records = []
    for image_id, path in sorted(files.items()):
        number, text = reports.get(image_id, (-1, ""))
        ids = {"dicom_id": image_id, "subject_id": number, "study_id": number}
        view = views["View Position"].get(
            image_id, views["View Position"].get(REPORT_NUMBER_IN_ID.sub(r"\1_\2", image_id))
        )
        prompt, source = extract_impression(text, fallbacks) if text else ("", "none")
        reason, detail = None, ""
        if number < 0:
            reason = "not in the reports"
        elif not isinstance(view, str) or view.upper() not in VIEWS_KEPT:
            reason, detail = "not a frontal view", f"View Position {view if isinstance(view, str) else 'not recorded'}"
        elif source == "none":
            reason = "no impression" if not fallbacks else "no usable text"
        elif len(prompt) < MIN_IMPRESSION_CHARS:
            reason, detail = "short impression", f"{len(prompt)} characters"
        if reason is not None:
            reasons[reason] = reasons.get(reason, 0) + 1
            skipped.append(skipped_row("table", ids, reason, detail, str(path)))
            continue
        records.append(
            {
                **ids,
                "view": view.upper(),
                "impression": prompt,
                "impression_source": source,
                "image_path": str(path),
                **{label: float("nan") for label in LABELS},
            }
        )
    rows = pd.DataFrame(records, columns=list(ROW_COLUMNS))
    counts["skipped_by_reason"] = dict(sorted(reasons.items()))
    counts["impression_sources"] = {s: int((rows["impression_source"] == s).sum()) for s in SOURCES}
    data_set = {
        "name": "Open-i (IU X-ray)",
        "format": "openi",
        "text_source": "impressions",
        "text": "the report's IMPRESSION, by the MIMIC parser",
        "grounding": "none: Open-i has no finding boxes",
    }
    return Candidates(rows, None, counts, skipped, data_set)


OPENI = PublicFormat("openi", openi_tables, read_openi)
