"""Radiology report text → the training prompt (the IMPRESSION), as the MIMIC-CXR authors' parser does it.

MIMIC-CXR reports are free text whose sections start with an upper-case heading and a colon at the
start of a line ("IMPRESSION:", "FINDINGS:"). Headings are normalised (lower case, variants and
misspellings mapped to a canonical name); the *last* impression wins; with none, the last findings;
with neither, the last paragraph. Written from that behaviour, not from their code; no library parses
MIMIC sections, so this is hand-written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# An upper-case heading at the start of a line, then ':' and a space or the end of the line.
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&-]*[A-Z)])[ \t]*:(?=\s|$)", re.MULTILINE)
_FINAL_REPORT = re.compile(r"^\s*FINAL REPORT\s*$", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")

_IMPRESSION_NAMES = {
    "impression",
    "impressions",
    "conclusion",
    "conclusions",
    "findings and impression",
    "findings and impressions",
    "impression and findings",
    "findings/impression",
    "findings/impressions",
    "findings / impression",
    "findings/ impression",
    "findings /impression",
    # misspellings seen in MIMIC-CXR
    "impresson",
    "imprression",
    "imoression",
    "impressoin",
    "imprssion",
    "impresion",
    "imperssion",
    "mpression",
    "impession",
    "impresssion",
    "impressio",
    "impressiom",
}
_FINDINGS_NAMES = {
    "findings",
    "finding",
    "findins",
    "findindgs",
    "findgings",
    "findngs",
    "findnings",
    "finidngs",
    "findigns",
    "fidings",
}

SOURCES = ("impression", "findings", "last_paragraph", "none")


def normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def section_name(heading: str) -> str:
    """A heading as a canonical section name: impression variants → 'impression', etc."""
    name = " ".join(heading.lower().split())
    if name in _IMPRESSION_NAMES:
        return "impression"
    if name in _FINDINGS_NAMES:
        return "findings"
    return name


def split_sections(text: str) -> list[tuple[str, str]]:
    """(canonical name, raw text) for each section in order; text before the first heading is 'preamble'."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    matches = list(_HEADING.finditer(text))
    sections = [("preamble", text[: matches[0].start()] if matches else text)]
    bounds = [m.start() for m in matches] + [len(text)]
    for i, match in enumerate(matches):
        sections.append((section_name(match.group(1)), text[match.end() : bounds[i + 1]]))
    return sections


def extract_impression(text: str) -> tuple[str, str]:
    """(prompt text, source) with source one of impression | findings | last_paragraph | none.

    An empty impression counts as missing (falls back to findings); whitespace is collapsed to single
    spaces; de-identification placeholders ('___') are kept as they are.
    """
    sections = split_sections(text)
    for wanted in ("impression", "findings"):
        found = [body for name, body in sections if name == wanted and normalise_whitespace(body)]
        if found:
            return normalise_whitespace(found[-1]), wanted
    body = _FINAL_REPORT.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    paragraphs = [normalise_whitespace(p) for p in _PARAGRAPH_BREAK.split(body)]
    paragraphs = [p for p in paragraphs if p]
    if paragraphs:
        return paragraphs[-1], "last_paragraph"
    return "", "none"


def report_path(files: str | os.PathLike, subject_id: int, study_id: int) -> Path:
    """A study's report under MIMIC-CXR's `files/` folder: p{first two digits}/p{subject}/s{study}.txt."""
    subject = str(int(subject_id))
    return Path(files) / f"p{subject[:2]}" / f"p{subject}" / f"s{int(study_id)}.txt"


def read_report(path: str | os.PathLike) -> tuple[str, str, str | None]:
    """(prompt, source, fault) for one report file; fault is 'missing report' / 'unreadable report' or None."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "", "none", "missing report"
    except OSError:
        return "", "none", "unreadable report"
    prompt, source = extract_impression(text)
    return prompt, source, None
