"""Radiology report text → the training prompt (the IMPRESSION), as the MIMIC-CXR authors' parser does it.

MIMIC-CXR reports are free text whose sections start with an upper-case heading and a colon at the
start of a line ("IMPRESSION:", "FINDINGS:"). Headings are normalised as the MIMIC-CXR authors' section
parser does (its table of headings and misspellings, then its substring and whole-study rules); the
*last* impression wins. The parser also offers the last findings and the "last paragraph" as fallbacks;
`prepare` uses them only when asked (`--text-fallback`), since the paper trained on impressions only.
Written from that behaviour, not from their code; no library parses MIMIC sections, so this is
hand-written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

# An upper-case heading at the start of a line, then ':' and a space or the end of the line.
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&-]*[A-Z)])[ \t]*:(?=\s|$)", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")

# The MIMIC-CXR authors' heading normalisation (their section parser): a table of known headings and
# misspellings first; then any heading containing one of the main section names is that section; then a
# heading that describes the whole study ("CHEST, PA AND LATERAL", "PORTABLE AP") counts as findings.
_KNOWN_HEADINGS = {
    "preamble": "preamble",
    "impression": "impression",
    "comparison": "comparison",
    "indication": "indication",
    "findings": "findings",
    "examination": "examination",
    "technique": "technique",
    "history": "history",
    "comparisons": "comparison",
    "clinical history": "history",
    "reason for examination": "indication",
    "notification": "notification",
    "reason for exam": "indication",
    "clinical information": "history",
    "exam": "examination",
    "clinical indication": "indication",
    "conclusion": "impression",
    "conclusions": "impression",
    "concusion": "impression",
    "chest, two views": "findings",
    "recommendation(s)": "recommendations",
    "type of examination": "examination",
    "reference exam": "comparison",
    "patient history": "history",
    "addendum": "addendum",
    "comparison exam": "comparison",
    "date": "date",
    "comment": "comment",
    "findings and impression": "impression",
    "wet read": "wet read",
    "comparison film": "comparison",
    "recommendations": "recommendations",
    "findings/impression": "impression",
    "pfi": "history",
    "recommendation": "recommendations",
    "wetread": "wet read",
    "summary": "impression",
    "impresssion": "impression",
    "impressio": "impression",
    "ndication": "impression",  # sic: the authors' table maps it so (one report)
    "impresson": "impression",
    "imprression": "impression",
    "imoression": "impression",
    "impressoin": "impression",
    "imprssion": "impression",
    "impresion": "impression",
    "imperssion": "impression",
    "mpression": "impression",
    "impession": "impression",
    "findings/ impression": "impression",
    "finding": "findings",
    "findins": "findings",
    "findindgs": "findings",
    "findgings": "findings",
    "findngs": "findings",
    "findnings": "findings",
    "finidngs": "findings",
    "idication": "indication",
    "reference findings": "findings",
    "comparision": "comparison",
    "comparsion": "comparison",
    "comparrison": "comparison",
    "comparisions": "comparison",
}
_MAIN_SECTIONS = ("impression", "findings", "history", "comparison", "addendum")
_WHOLE_STUDY = re.compile(
    "chest|portable|pa and lateral|lateral and pa|ap and lateral|lateral and ap|frontal and|two views|"
    "frontal view|pa view|ap view|one view|lateral view|bone window|frontal upright|frontal semi-upright|ribs|"
    "pa and lat"
)

SOURCES = ("impression", "findings", "last_paragraph", "none")
FALLBACKS = ("findings", "last_paragraph")  # in the parser's order of preference, after the impression


MIN_IMPRESSION_CHARS = 8  # the paper keeps impressions longer than 7 characters (prepare and pretrain-text)


def normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def section_name(heading: str) -> str:
    """A heading as a canonical section name, by the MIMIC-CXR authors' rules (see `_KNOWN_HEADINGS`)."""
    name = " ".join(heading.lower().split())
    if name in _KNOWN_HEADINGS:
        return _KNOWN_HEADINGS[name]
    for main in _MAIN_SECTIONS:
        if main in name:
            return main
    return "findings" if _WHOLE_STUDY.search(name) else name


def split_sections(text: str) -> list[tuple[str, str]]:
    """(canonical name, raw text) for each section in order; text before the first heading is 'preamble'."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    matches = list(_HEADING.finditer(text))
    sections = [("preamble", text[: matches[0].start()] if matches else text)]
    bounds = [m.start() for m in matches] + [len(text)]
    for i, match in enumerate(matches):
        sections.append((section_name(match.group(1)), text[match.end() : bounds[i + 1]]))
    return sections


def extract_impression(text: str, fallbacks: Sequence[str] = FALLBACKS) -> tuple[str, str]:
    """(prompt text, source) with source one of impression | findings | last_paragraph | none.

    The last non-empty impression; else, in the order given and only those in `fallbacks`, the last
    non-empty findings, then the last paragraph. The last paragraph follows the authors' rule: only when
    the report has neither section, it is everything after the first paragraph of the report's last
    section. Whitespace is collapsed to single spaces; de-identification placeholders ('___') are kept.
    """
    unknown = sorted(set(fallbacks) - set(FALLBACKS))
    if unknown:
        raise ValueError(f"fallbacks: {', '.join(unknown)} not among {', '.join(FALLBACKS)}")
    sections = [  # as the authors' parser: empty impression and findings sections are dropped, no others
        (name, body)
        for name, body in split_sections(text)
        if normalise_whitespace(body) or name not in ("impression", "findings")
    ]
    for wanted in ("impression", *(f for f in FALLBACKS if f in fallbacks)):
        if wanted == "last_paragraph":
            if sections and not any(name in ("impression", "findings") for name, _ in sections):
                paragraphs = [p for p in _PARAGRAPH_BREAK.split(sections[-1][1]) if p.strip()]
                rest = normalise_whitespace(" ".join(paragraphs[1:]))
                if rest:
                    return rest, "last_paragraph"
            continue
        found = [body for name, body in sections if name == wanted]
        if found:
            return normalise_whitespace(found[-1]), wanted
    return "", "none"


def report_path(files: str | os.PathLike, subject_id: int, study_id: int) -> Path:
    """A study's report under MIMIC-CXR's `files/` folder: p{first two digits}/p{subject}/s{study}.txt."""
    subject = str(int(subject_id))
    return Path(files) / f"p{subject[:2]}" / f"p{subject}" / f"s{int(study_id)}.txt"


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")  # C0 controls but tab, newlines and form feed


def decode_report(data: bytes) -> str | None:
    """A report file's text as what it is: UTF-8 (a byte-order mark allowed), UTF-16 when it starts with its
    byte-order mark, else Windows-1252 (the usual encoding of hospital exports that are not UTF-8; it reads
    Latin-1's letters too). None when no such reading gives text: bytes Windows-1252 leaves undefined,
    control characters (a binary file), or U+FFFD already in it (a lossy conversion upstream); replacement
    characters never reach a prompt."""
    candidates = ("utf-16",) if data.startswith((b"\xff\xfe", b"\xfe\xff")) else ("utf-8-sig", "cp1252")
    for encoding in candidates:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        return None if "\ufffd" in text or _CONTROL.search(text) else text
    return None


def read_report(path: str | os.PathLike, fallbacks: Sequence[str] = FALLBACKS) -> tuple[str, str, str | None]:
    """(prompt, source, fault) for one report file; fault is 'missing report' / 'unreadable report' /
    'undecodable report' (see `decode_report`) or None."""
    try:
        text = decode_report(Path(path).read_bytes())
    except FileNotFoundError:
        return "", "none", "missing report"
    except OSError:
        return "", "none", "unreadable report"
    if text is None:
        return "", "none", "undecodable report"
    prompt, source = extract_impression(text, fallbacks)
    return prompt, source, None
